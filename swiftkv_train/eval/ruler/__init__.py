"""A RULER-style synthetic long-context suite (Hsieh et al. 2024, NVIDIA/RULER), generated locally.

tasks.py the 13 task definitions; words.py keys, values and word lists; haystack.py essay / noise / needle
haystacks as token streams; prompt.py the chat framing and the context / question split; generators.py and qa.py
the task families; data.py seeding and the disk cache; scoring.py RULER's metrics; suite.py the runner.
"""

from .data import GENERATOR_VERSION, load_samples
from .generators import GENERATORS, Resources
from .prompt import Sample
from .scoring import score, string_match_all, string_match_part
from .suite import check_config, prepare, run_ruler, run_task
from .tasks import FAMILIES, TASK_NAMES, TASKS

__all__ = ["FAMILIES", "TASKS", "TASK_NAMES", "GENERATORS", "GENERATOR_VERSION", "Resources", "Sample",
           "load_samples", "check_config", "prepare", "run_ruler", "run_task", "score", "string_match_all",
           "string_match_part"]
