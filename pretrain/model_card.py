"""Model cards: the ``README.md`` written with every artifact, rendered from its ``encoder.json`` alone.

A card says what the artifact holds (kind, architecture, parameter count), where it came from (method and
provenance), what data it expects (the data contract), how to load it (Python and the ``pcpt-finetune``
commands), what it needs besides itself (the frozen source model or base encoder of ``any2point`` and
``point_adapter`` encoders) and the evaluations recorded so far (``meta["evaluations"]``, appended by
``pcpt-finetune probe`` and ``fewshot``). :func:`render_model_card` is deterministic: the same metadata and
folder name give the same text (the only dates are those recorded in the metadata).

A card starts with :data:`CARD_MARKER`; :func:`is_model_card` tells a card pcpt wrote (and may replace) from
a README a user keeps in the artifact folder (which pcpt never touches).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CARD_FILE", "CARD_MARKER", "is_model_card", "render_model_card"]

#: the card's file name inside the artifact folder.
CARD_FILE = "README.md"
#: the first line of every card pcpt writes.
CARD_MARKER = (
    "<!-- pcpt model card: generated from encoder.json, rewritten whenever pcpt updates this artifact; "
    "keep your own notes in another file -->"
)

_PROVENANCE_ROWS = (
    ("method", "method"),
    ("step", "step"),
    ("epoch", "epochs trained"),
    ("git_sha", "pcpt git sha"),
    ("config_sha256", "config sha256"),
    ("data_manifest_sha256", "data manifest sha256"),
    ("init_from", "initialised from"),
    ("source", "source"),
    ("source_sha256", "source sha256"),
    ("base", "frozen base"),
)
_CONTRACT_ROWS = (
    ("num_points", "points per cloud"),
    ("normalization", "normalisation"),
    ("fps_order", "farthest-point order"),
    ("channels", "channels"),
)
#: evaluation entry fields shown after the result, with their labels.
_CONTEXT = {
    "data": "data",
    "num_points": "points per cloud",
    "manifest_sha256": "data manifest sha256",
    "git_sha": "pcpt git sha",
}


def is_model_card(text: str) -> bool:
    """Whether ``text`` (a README's content) is a card pcpt wrote, i.e. starts with :data:`CARD_MARKER`."""
    return text.startswith(CARD_MARKER)


def render_model_card(meta: Mapping[str, Any], *, folder: str = "ARTIFACT") -> str:
    """The model card of an artifact, as markdown.

    Args:
        meta: the artifact's metadata (``encoder.json``): kind, spec, data_contract, provenance, num_params
            and optionally evaluations.
        folder: the artifact folder's name, used as the path in the loading instructions (they work from the
            folder that holds the artifact).

    Returns:
        The card's text, starting with :data:`CARD_MARKER` and ending with a newline.
    """
    sections = [
        CARD_MARKER,
        _title(meta),
        _provenance_section(meta),
        _architecture_section(meta),
        _contract_section(meta),
        _frozen_section(meta),
        _loading_section(meta, folder),
        _evaluations_section(meta.get("evaluations") or [], str(meta.get("kind"))),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


# ------------------------------------------------------------------------------------------------ pieces


def _text(value: Any) -> str:
    """One value as inline markdown: scalars as they are, containers as compact sorted JSON."""
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {_text(value[key])}" for key in sorted(value, key=str)) or "none"
    if isinstance(value, (list, tuple)):
        return f"`{json.dumps(value, sort_keys=True, default=str)}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value.replace('|', '&#124;')} |" for key, value in rows]
    return "\n".join(lines)


def _title(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec") or {}
    method = (meta.get("provenance") or {}).get("method")
    title = f"# {meta.get('kind', 'unknown kind')}"
    title += f": {spec['arch']}" if spec.get("arch") else ""
    intro = f"A pcpt artifact ({meta.get('format', 'pcpt-encoder/1')})"
    intro += f" trained by {method}." if method else "."
    return f"{title}\n\n{intro} Weights: `encoder.safetensors`; metadata: `encoder.json`."


def _provenance_section(meta: Mapping[str, Any]) -> str:
    provenance = dict(meta.get("provenance") or {})
    rows = [(label, _text(provenance.pop(key))) for key, label in _PROVENANCE_ROWS if key in provenance]
    versions = provenance.pop("versions", None)
    if isinstance(versions, Mapping):
        rows.append(("library versions", ", ".join(f"{k} {versions[k]}" for k in sorted(versions))))
    rows += [(key, _text(provenance[key])) for key in sorted(provenance)]
    if not rows:
        return "## Method and provenance\n\nNo provenance recorded."
    return "## Method and provenance\n\n" + _table(rows)


def _architecture_line(meta: Mapping[str, Any]) -> str:
    """The kind's one-line summary (``pcpt-pretrain export|import`` print the same)."""
    from pretrain.artifacts import ArtifactError, artifact_kind  # imports this module's writer

    if not meta.get("spec"):
        return "no architecture spec recorded"
    try:
        return artifact_kind(str(meta.get("kind"))).summary(meta)
    except (ArtifactError, KeyError, TypeError, ValueError):
        return f"{meta['spec'].get('arch', 'unknown architecture')}"


def _architecture_section(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec") or {}
    params = meta.get("num_params")
    lines = [
        "## Architecture",
        "",
        f"{_architecture_line(meta)}.",
        "",
        f"Parameters: {params:,}." if isinstance(params, int) else "Parameters: not recorded.",
    ]
    if meta.get("extra_tensors"):
        lines.append(f"Stored alongside the weights: {_text(list(meta['extra_tensors']))}.")
    if spec:
        lines += ["", "The full spec (the module is rebuilt from it alone):", "", "```json"]
        lines += [json.dumps(spec, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines)


def _contract_section(meta: Mapping[str, Any]) -> str:
    contract = dict(meta.get("data_contract") or {})
    if not contract:
        return "## Data contract\n\nNo data contract recorded."
    rows = [(label, _text(contract.pop(key))) for key, label in _CONTRACT_ROWS if key in contract]
    rows += [(key, _text(contract[key])) for key in sorted(contract)]
    note = (
        "Downstream data must be preprocessed the same way; `pcpt-finetune` checks it against the shards' "
        "manifest and refuses or warns on a mismatch."
    )
    return "## Data contract\n\n" + _table(rows) + "\n\n" + note


def _frozen_section(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec") or {}
    if spec.get("source_path"):
        return (
            "## Frozen source model (required)\n\n"
            "This artifact holds only the trained parts; the frozen source model is not in it. The file "
            f"`{spec['source_path']}` (layout {_text(spec.get('source_layout'))}, sha256 "
            f"{_text(spec.get('source_sha256'))}) must be present when the artifact is loaded: at that path "
            "(`pkg:` paths: inside the installed package), or by its file name in the folder named by "
            "`$PCPT_SOURCES`. A file with another sha256 is refused."
        )
    if spec.get("base_path"):
        return (
            "## Frozen base encoder (required)\n\n"
            "This artifact holds only the adapters; the frozen base encoder is not in it. The artifact "
            f"`{spec['base_path']}` (sha256 of its `encoder.safetensors`: {_text(spec.get('base_sha256'))}) "
            "must be present at that path when this artifact is loaded. Other weights are refused."
        )
    return ""


def _loading_section(meta: Mapping[str, Any], folder: str) -> str:
    kind = meta.get("kind")
    loader = {"point_encoder": "load_encoder", "image_encoder": "load_image_encoder"}.get(str(kind))
    name = loader or "load_artifact"
    snippet = [
        "```python",
        f"from pretrain.artifacts import {name}",
        "",
        f'module, meta = {name}("{folder}")',
        "module.eval()",
        "```",
    ]
    lines = [
        "## How to load it",
        "",
        f"From the folder that holds `{folder}`, in Python (strict: every weight must fit the spec):",
        "",
        *snippet,
    ]
    commands = _commands(str(kind), folder)
    if commands:
        lines += ["", "With the command-line tools:", "", "```sh", *commands, "```"]
    return "\n".join(lines)


def _commands(kind: str, folder: str) -> list[str]:
    if kind == "point_encoder":
        return [
            f"pcpt-finetune probe {folder} --data SHARDS",
            f"pcpt-finetune fewshot {folder} --data SHARDS --way 5 --shot 10",
            f"pcpt-finetune embed {folder} --input CLOUDS.npy --out FEATURES.npz",
            f"pcpt-finetune fit -c configs/finetune/classify.yaml --model.pretrained {folder}",
        ]
    if kind == "dvae_tokenizer":
        return [
            f"pcpt-pretrain eval-tokenizer {folder} --data SHARDS",
            f"pcpt-finetune embed {folder} --input CLOUDS.npy --out TOKENS.npz",
            f"pcpt-pretrain fit -c configs/pretrain/point_bert.yaml --model.init_args.dvae {folder}",
        ]
    if kind == "scene_encoder":
        return [f"pcpt-finetune embed {folder} --input SCAN.las --out FEATURES.npz"]
    return []


# ------------------------------------------------------------------------------------------- evaluations


def _percent(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{100 * value:.2f}"
    return "n/a"


def _evaluation_line(entry: Mapping[str, Any]) -> str:
    command = entry.get("command")
    if command == "probe":
        result = (
            f"**probe** ({entry.get('protocol')}): test accuracy **{_percent(entry.get('accuracy'))} %** "
            f"(single pass) on split {_text(entry.get('test_split'))}, fitted on "
            f"{_text(entry.get('train_split'))}"
        )
    elif command == "fewshot":
        result = (
            f"**fewshot** ({entry.get('protocol')}): {entry.get('way')}-way {entry.get('shot')}-shot, "
            f"**{_percent(entry.get('mean'))} ± {_percent(entry.get('std'))} %** over {entry.get('folds')} "
            f"folds (support {_text(entry.get('support_split'))}, query {_text(entry.get('query_split'))}), "
            f"episodes sha256 {_text(entry.get('episodes_sha256'))}"
        )
    else:
        shown = {k: v for k, v in entry.items() if k not in ("command", *_CONTEXT, "date")}
        result = f"**{command or 'evaluation'}**: {_text(shown)}"
    context = [f"{label} {_text(entry[key])}" for key, label in _CONTEXT.items() if key in entry]
    return f"- {entry.get('date', 'undated')}: " + "; ".join([result, *context])


def _evaluations_section(evaluations: Sequence[Any], kind: str) -> str:
    lines = ["## Evaluations recorded", ""]
    entries = [e for e in evaluations if isinstance(e, Mapping)]
    if not entries:
        lines.append("None yet.")
        if kind == "point_encoder":
            lines[-1] += (
                " `pcpt-finetune probe` and `pcpt-finetune fewshot` record their results here and in "
                "`encoder.json` (`--no-record` skips it)."
            )
        return "\n".join(lines)
    lines += [_evaluation_line(e) for e in entries]
    return "\n".join(lines)
