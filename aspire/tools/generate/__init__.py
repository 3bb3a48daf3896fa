"""Step 5's generation (see generator.py): the Generator and its two backends, and the records they exchange."""

from aspire.tools.generate.generator import Generator
from aspire.tools.generate.records import (Background, ClassJob, GeneratedImage, LearnedToken, SourceEdit, class_slug,
                                           color_jitter, derive_seed, sha256_file, token_for)

__all__ = ["Background", "ClassJob", "GeneratedImage", "Generator", "LearnedToken", "SourceEdit", "class_slug",
           "color_jitter", "derive_seed", "sha256_file", "token_for"]
