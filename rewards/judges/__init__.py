"""API judges: provider clients, the fault-tolerant judge, its verdict cache and credential checks."""
from .api_judge import ApiJudge, JudgeOutcome, JudgeRequest
from .cache import CACHE_FILENAME, VerdictCache, cache_key
from .credentials import JudgeCredentialsError, check_judge_credentials, provider_spec, redact
from .verdict_prompts import parse_verdict

__all__ = ["ApiJudge", "JudgeOutcome", "JudgeRequest", "CACHE_FILENAME", "VerdictCache", "cache_key",
           "JudgeCredentialsError", "check_judge_credentials", "provider_spec", "redact", "parse_verdict"]
