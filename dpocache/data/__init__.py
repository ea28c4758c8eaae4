"""The data layer: sources, formats, mixtures, chat templates, masking, example hash, bad input.

See ``docs/data.md``. Entry points: :func:`prepare_tokenizer`, then :func:`load_preference_data`.
"""

from dpocache.data.config import DataConfig
from dpocache.data.errors import DataError
from dpocache.data.prepare import EXAMPLE_COLUMNS, PreparedData, load_preference_data, mixture_digest, mixture_name
from dpocache.data.templates import CHAT_TEMPLATES, prepare_tokenizer
from dpocache.data.tokenize import HASH_VERSION, example_hash

__all__ = ["CHAT_TEMPLATES", "DataConfig", "DataError", "EXAMPLE_COLUMNS", "HASH_VERSION", "PreparedData",
           "example_hash", "load_preference_data", "mixture_digest", "mixture_name", "prepare_tokenizer"]
