"""Where the paper's code departs from its text, per code family (`model.reference_code`).

Torch-free, so the analysis can say which of a table's rows the flag would change.
"""

from __future__ import annotations

# memory_mosaics_eft.py (LM and length runs): the query at t gets the mask row of t − 1
LAG2_KERNELS: tuple[str, ...] = ("relumax", "normrelu", "topk_uniform")
# seq_icl's memory_mosaics.py (RegBench): scores on β-scaled keys divided by γ ∝ 1/β², i.e. β⁴·cos
BETA4_KERNELS: tuple[str, ...] = ("relumax", "normrelu")
# memory_mosaics_eft.py: float32 keys and values into these kernels (rounding only)
FLOAT32_KERNELS: tuple[str, ...] = ("sparsemax", "entmax")

FAMILIES = ("lm_length", "regbench")
CHANGED_KERNELS: dict[str, tuple[str, ...]] = {"lm_length": LAG2_KERNELS, "regbench": BETA4_KERNELS}
QUIRKS: dict[str, str] = {
    "lm_length": "keys ≤ t−2 for normReLU, ReLUmax and uniform kNN (memory_mosaics_eft.py)",
    "regbench": "ReLUmax and normReLU on β⁴·cos (seq_icl's memory_mosaics.py)",
}


def family_of_task(task_name: str) -> str:
    """The paper code that ran a task's experiment: seq_icl for RegBench, else the LM/length code."""
    return "regbench" if task_name == "regbench" else "lm_length"
