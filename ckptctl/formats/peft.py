"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (fixtures/lora/README.md).

The config says what the tensors cannot (alpha, rsLoRA, the base model); the tensors say what the config only
claims (the rank each module really has). Both are small, so both are read whole.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from ckptctl.errors import IntegrityError
from ckptctl.formats.model import Defect, TensorInfo
from ckptctl.storage.location import Location

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_(?:A\.weight|embedding_A)$")


# A config is a few hundred bytes; a large rank_pattern a few KB.
MAX_ADAPTER_CONFIG_BYTES = 1024 * 1024


def read_adapter_config(location: Location, rel: str = ADAPTER_CONFIG) -> dict[str, Any]:
    """The parsed config: a regular file of at most ``MAX_ADAPTER_CONFIG_BYTES`` holding a JSON object, else an
    IntegrityError (a FIFO, a huge or deeply nested file never hangs or crashes the reader)."""
    url = location.url_of(rel)
    try:
        config = json.loads(location.read_bytes(rel, max_bytes=MAX_ADAPTER_CONFIG_BYTES))
    except ValueError as exc:
        raise IntegrityError(f"{url}: not valid JSON ({exc})", url=url) from None
    except RecursionError:
        raise IntegrityError(f"{url}: JSON nested too deeply", url=url) from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{url}: not a JSON object", url=url)
    return config


def rank_patterns(config: dict[str, Any]) -> tuple[list[tuple[re.Pattern[str], int]], list[str]]:
    r"""``rank_pattern`` compiled as PEFT matches it (``(.*\.)?(key)$``), and what is wrong with it: a value
    that is not an object, a key that is not a valid regular expression, a rank that is not a positive int."""
    compiled, problems = _patterns(config, "rank_pattern", _positive_int, "a positive integer")
    return [(pattern, int(rank)) for pattern, rank in compiled], problems


def _patterns(
    config: dict[str, Any], field: str, valid: Callable[[Any], bool], wanted: str
) -> tuple[list[tuple[re.Pattern[str], Any]], list[str]]:
    """A ``rank_pattern``-shaped field (regex -> value) compiled, and what is wrong with it."""
    raw = config.get(field) or {}
    if not isinstance(raw, dict):
        return [], [f"{field} is {_kind(raw)}, not an object"]
    compiled, problems = [], []
    for key, value in raw.items():
        if not valid(value):
            problems.append(f"{field} {_shown(key)}: {_shown(value)} is not {wanted}")
            continue
        pattern = _compiled(rf"(.*\.)?({key})$")
        if isinstance(pattern, str):
            problems.append(f"{field} key {_shown(key)} is not a valid regular expression ({pattern})")
        else:
            compiled.append((pattern, value))
    return compiled, problems


MAX_PATTERN_CHARS = 4096


def _compiled(pattern: str) -> re.Pattern[str] | str:
    """The compiled pattern, or why it is refused: it does not compile (``re`` raises more than re.error on
    hostile input), or it could take exponential time to match a module name (see ``_backtracks``)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        compiled = re.compile(pattern)
        risky = _backtracks(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return str(exc)
    return f"it could take exponential time to match ({risky}); spell it without that" if risky else compiled


def _backtracks(pattern: str) -> str | None:
    r"""What makes a regex backtrack exponentially, if anything: a repeat inside a repeat (``(a+)+``), an
    alternation under a repeat (``(a|ab)*``) or a backreference. Python's ``re`` has no time limit, so a
    crafted ``rank_pattern`` could hang extract-lora on one module name; PEFT's own keys (module paths,
    ``q_proj|v_proj``, ``layers\.\d+\.mlp``) never have these shapes."""
    try:
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser  # type: ignore[no-redef]

    def walk(items: Any, repeated: bool) -> str | None:
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _low, high, sub = arg
                many = high is parser.MAXREPEAT or high > 1
                if many and repeated:
                    return "a repeat inside a repeat"
                found = walk(sub, repeated or many)
            elif name == "SUBPATTERN":
                found = walk(arg[-1], repeated)
            elif name == "BRANCH":
                if repeated:
                    return "an alternation under a repeat"
                found = next((f for f in (walk(b, repeated) for b in arg[1]) if f), None)
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(arg[1], repeated)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "a backreference"
            else:
                found = None
            if found:
                return found
        return None

    return walk(parser.parse(pattern), False)


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _kind(value: Any) -> str:
    """What a JSON value is, for a message: "null", "a string", "an object"..."""
    return _JSON_KINDS.get(type(value), f"a {type(value).__name__}")


_JSON_KINDS = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _shown(value: Any) -> str:
    """A config value for a message, short whatever it holds."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


BIAS_MODES = ("none", "all", "lora_only")


def config_problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with the fields of a LoRA ``adapter_config.json`` that ckptctl reads or carries into an
    adapter it writes, each message naming its field: types, ranges, and regexes that do not compile."""
    problems = rank_patterns(config)[1]
    problems += _patterns(config, "alpha_pattern", _positive_number, "a positive finite number")[1]
    if "r" in config and not _positive_int(config["r"]):
        problems.append(f"r is {_shown(config['r'])}, not a positive integer")
    if config.get("lora_alpha") is not None and not _positive_number(config["lora_alpha"]):
        problems.append(f"lora_alpha is {_shown(config['lora_alpha'])}, not a positive finite number")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        pattern = _compiled(targets)
        if isinstance(pattern, str):
            problems.append(f"target_modules {_shown(targets)} is not a valid regular expression ({pattern})")
    elif not (targets is None or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules is {_kind(targets)}, not a list of names or a regex")
    saved = config.get("modules_to_save")
    if not (saved is None or (isinstance(saved, list) and all(isinstance(t, str) for t in saved))):
        problems.append(f"modules_to_save is {_kind(saved)}, not a list of names")
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            problems.append(f"{flag} is {_shown(config[flag])}, not true or false")
    if "bias" in config and config["bias"] not in BIAS_MODES:
        problems.append(f"bias is {_shown(config['bias'])}, not one of {', '.join(BIAS_MODES)}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (type(dropout) in (int, float) and 0 <= dropout <= 1):
        problems.append(f"lora_dropout is {_shown(dropout)}, not a number from 0 to 1")
    for name in ("task_type", "base_model_name_or_path", "peft_type"):
        if config.get(name) is not None and not isinstance(config[name], str):
            problems.append(f"{name} is {_kind(config[name])}, not a string")
    return problems


def check_adapter_config(config: dict[str, Any], url: str) -> None:
    """Refuse (IntegrityError naming the file and the field) a config ``config_problems`` finds fault with."""
    problems = config_problems(config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(f"{url}: {problems[0]}{more}", url=url)


def _rank_for(module: str, patterns: list[tuple[re.Pattern[str], int]], r: Any) -> int | None:
    """The configured rank of a module: the first matching ``rank_pattern`` entry, else ``r``."""
    for pattern, rank in patterns:
        if pattern.match(module):
            return rank
    return r if type(r) is int else None


def peft_facts(
    config: dict[str, Any], tensors: tuple[TensorInfo, ...], weights_file: str
) -> tuple[dict[str, Any], list[Defect]]:
    """The adapter's settings and size, and a defect for every LoRA A whose rank disagrees with the config."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    scaling = None
    if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    targets = config.get("target_modules")
    patterns = rank_patterns(config)[0]
    defects = [Defect(ADAPTER_CONFIG, problem) for problem in config_problems(config)]
    modules = []
    for tensor in tensors:
        match = _LORA_A.match(tensor.name)
        if not match or not tensor.shape:
            continue
        module = match.group("module")
        modules.append(module)
        expected = _rank_for(module, patterns, r)
        if expected is not None and tensor.shape[0] != expected:
            defects.append(
                Defect(
                    weights_file,
                    f"{tensor.name} has rank {tensor.shape[0]}, adapter_config.json says {expected}",
                )
            )
    facts = {
        "peft_type": config.get("peft_type"),
        "r": r,
        "lora_alpha": alpha,
        "scaling": scaling,
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "target_modules": sorted(targets)
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets)
        else targets,
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern")
        or {},  # as written (plain values: Inspection renders safely)
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "peft_version": config.get("peft_version"),
        "adapted_modules": len(modules),
    }
    return facts, defects
