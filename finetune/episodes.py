"""Few-shot episodes: seeded generation and a versioned episode file with a checksum.

Episode protocol (Point-BERT / Point-MAE, METHODS §1.7): per fold, ``way`` classes are drawn at random; for
each, ``shot`` support objects from the train split and ``query`` (20) query objects from the **test** split;
labels are re-indexed ``0..way-1`` in the order of the episode's ``classes``. The official generator sets no
seed, so everyone reuses the authors' pickles; pcpt draws from ``np.random.default_rng(seed)`` and identifies
samples by their shard keys, so the same file reproduces the same episodes anywhere. ``query_split="train"``
gives the CrossPoint / ViPFormer variant (queries from the train split, disjoint from the support set; the
numbers are not comparable with the test-split protocol).

Episode file (JSON, ``format: "pcpt-fewshot/1"``)::

    {"format", "way", "shot", "query", "folds", "seed", "support_split", "query_split",
     "dataset": {"manifest_sha256", "classes"},
     "episodes": [{"classes": [name, ...], "support": [key, ...], "query": [key, ...]}, ...],
     "sha256": sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of everything else}

``support`` lists ``shot`` keys of ``classes[0]``, then ``shot`` keys of ``classes[1]``, and so on; ``query``
likewise with ``query`` keys per class. The protocols that evaluate the episodes are in
:mod:`finetune.fewshot`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.errors import UserError

__all__ = [
    "FORMAT",
    "Episode",
    "EpisodeSet",
    "canonical_sha256",
    "episode_labels",
    "generate_episodes",
]

FORMAT = "pcpt-fewshot/1"


def canonical_sha256(payload: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``payload`` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Episode:
    """One few-shot fold.

    Attributes:
        classes: dataset class names; episode label i is ``classes[i]``.
        support: ``way * shot`` sample keys, grouped by class in the order of ``classes``.
        query: ``way * query`` sample keys, grouped likewise.
    """

    classes: tuple[str, ...]
    support: tuple[str, ...]
    query: tuple[str, ...]


def episode_labels(count: int, way: int) -> np.ndarray:
    """Episode labels of ``count`` keys grouped by class: ``[0]*(count/way) + [1]*(count/way) + ...``."""
    if way < 1 or count % way:
        raise ValueError(f"count={count} is not a multiple of way={way}")
    return np.repeat(np.arange(way, dtype=np.int64), count // way)


@dataclass(frozen=True)
class EpisodeSet:
    """A reproducible set of few-shot episodes (one per fold) and the dataset they refer to.

    Attributes:
        way: classes per episode.
        shot: support samples per class.
        query: query samples per class.
        seed: seed the episodes were drawn with.
        manifest_sha256: sha256 of the dataset's ``manifest.json``.
        classes: all class names of the dataset (manifest order).
        episodes: one :class:`Episode` per fold.
        support_split: split the support keys come from.
        query_split: split the query keys come from.
    """

    way: int
    shot: int
    query: int
    seed: int
    manifest_sha256: str
    classes: tuple[str, ...]
    episodes: tuple[Episode, ...]
    support_split: str = "train"
    query_split: str = "test"

    @property
    def folds(self) -> int:
        """Number of episodes."""
        return len(self.episodes)

    def payload(self) -> dict[str, Any]:
        """The JSON document without its checksum."""
        return {
            "format": FORMAT,
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "folds": self.folds,
            "seed": self.seed,
            "support_split": self.support_split,
            "query_split": self.query_split,
            "dataset": {"manifest_sha256": self.manifest_sha256, "classes": list(self.classes)},
            "episodes": [
                {"classes": list(e.classes), "support": list(e.support), "query": list(e.query)}
                for e in self.episodes
            ],
        }

    @property
    def sha256(self) -> str:
        """Checksum of the canonical JSON of :meth:`payload`; identifies the episodes."""
        return canonical_sha256(self.payload())

    def to_dict(self) -> dict[str, Any]:
        """The JSON document with its checksum."""
        return {**self.payload(), "sha256": self.sha256}

    def save(self, path: str | Path) -> Path:
        """Writes the episode file atomically (temporary file, then rename) and returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "episode file") -> EpisodeSet:
        """Parses and verifies an episode document (format, checksum, shapes).

        Raises:
            UserError: wrong format, checksum mismatch or inconsistent episode sizes (``source`` is named).
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise UserError(f"{source}: not a {FORMAT} episode file (format {found!r})")
        payload = {k: v for k, v in data.items() if k != "sha256"}
        stored = data.get("sha256")
        if stored != canonical_sha256(payload):
            raise UserError(f"{source}: checksum mismatch; the episode file was modified or is corrupt")
        try:
            way, shot, query = int(data["way"]), int(data["shot"]), int(data["query"])
            dataset = data["dataset"]
            episodes = tuple(
                Episode(
                    classes=tuple(str(c) for c in e["classes"]),
                    support=tuple(str(k) for k in e["support"]),
                    query=tuple(str(k) for k in e["query"]),
                )
                for e in data["episodes"]
            )
            result = cls(
                way=way,
                shot=shot,
                query=query,
                seed=int(data["seed"]),
                manifest_sha256=str(dataset["manifest_sha256"]),
                classes=tuple(str(c) for c in dataset["classes"]),
                episodes=episodes,
                support_split=str(data.get("support_split", "train")),
                query_split=str(data.get("query_split", "test")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source}: malformed episode file ({type(err).__name__}: {err})") from None
        if int(data.get("folds", len(episodes))) != len(episodes):
            raise UserError(
                f"{source}: 'folds' is {data.get('folds')} but the file has {len(episodes)} episodes"
            )
        for i, ep in enumerate(episodes):
            if len(ep.classes) != way or len(ep.support) != way * shot or len(ep.query) != way * query:
                raise UserError(
                    f"{source}: episode {i} has {len(ep.classes)} classes, {len(ep.support)} support and "
                    f"{len(ep.query)} query keys; expected {way}, {way * shot} and {way * query}"
                )
        return result

    @classmethod
    def load(cls, path: str | Path) -> EpisodeSet:
        """Reads and verifies an episode file.

        Raises:
            UserError: missing or unreadable file, bad JSON, format or checksum (the path is named).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: episode file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read episode file ({err})") from None
        return cls.from_dict(data, source=str(path))

    def verify_data(
        self,
        *,
        classes: Sequence[str],
        support_keys: Sequence[str],
        support_labels: np.ndarray,
        query_keys: Sequence[str],
        query_labels: np.ndarray,
        manifest_sha256: str | None = None,
    ) -> list[str]:
        """Checks that every key exists in its split and carries the class the episode says.

        Args:
            classes: the dataset's class names (label i is ``classes[i]``).
            support_keys: keys of the support split, aligned with ``support_labels``.
            support_labels: (S,) labels of the support split.
            query_keys: keys of the query split, aligned with ``query_labels``.
            query_labels: (Q,) labels of the query split.
            manifest_sha256: the data's manifest checksum; a difference is returned as a warning.

        Returns:
            Warnings to show (manifest checksum differs); empty when everything matches.

        Raises:
            UserError: a missing key, a key of another class, or an unknown class (first problem named).
        """
        warnings: list[str] = []
        if manifest_sha256 is not None and manifest_sha256 != self.manifest_sha256:
            warnings.append(
                f"the episodes were drawn from a dataset with manifest sha256 {self.manifest_sha256[:12]}…, "
                f"this data has {manifest_sha256[:12]}…; all keys were found and checked"
            )
        names = [str(c) for c in classes]
        lookups = (
            ("support", self.support_split, dict(zip(support_keys, np.asarray(support_labels).tolist()))),
            ("query", self.query_split, dict(zip(query_keys, np.asarray(query_labels).tolist()))),
        )
        for fold, ep in enumerate(self.episodes):
            for cls_name in ep.classes:
                if cls_name not in names:
                    raise UserError(f"episode {fold}: class {cls_name!r} is not in the data's classes")
            for role, split, lookup in lookups:
                keys = ep.support if role == "support" else ep.query
                per_class = self.shot if role == "support" else self.query
                for j, key in enumerate(keys):
                    if key not in lookup:
                        raise UserError(
                            f"episode {fold}: {role} key {key!r} is not in the {split!r} split of the data"
                        )
                    want = ep.classes[j // per_class]
                    got = names[int(lookup[key])]
                    if got != want:
                        raise UserError(
                            f"episode {fold}: {role} key {key!r} has class {got!r} in the data, "
                            f"the episode file says {want!r}"
                        )
        return warnings


def generate_episodes(
    *,
    classes: Sequence[str],
    support_keys: Sequence[str],
    support_labels: np.ndarray,
    query_keys: Sequence[str] | None,
    query_labels: np.ndarray | None,
    way: int,
    shot: int,
    query: int = 20,
    folds: int = 10,
    seed: int = 0,
    manifest_sha256: str = "",
    support_split: str = "train",
    query_split: str = "test",
) -> EpisodeSet:
    """Draws ``folds`` episodes with ``np.random.default_rng(seed)``.

    Keys inside a class are sorted before drawing, so the result depends on the set of keys and labels, not
    on the order the shards list them in. Per fold: ``way`` distinct classes among those with at least
    ``shot`` support and ``query`` query candidates (in draw order), then per class ``shot`` support and
    ``query`` query keys without replacement. With ``query_keys=None`` the queries come from the support
    split, disjoint from that episode's support keys (CrossPoint / ViPFormer variant).

    Args:
        classes: dataset class names (label i is ``classes[i]``).
        support_keys: keys of the support split.
        support_labels: (S,) labels aligned with ``support_keys``.
        query_keys: keys of the query split, or None to draw queries from the support split.
        query_labels: (Q,) labels aligned with ``query_keys`` (None with ``query_keys=None``).
        way: classes per episode.
        shot: support samples per class.
        query: query samples per class.
        folds: number of episodes.
        seed: generator seed.
        manifest_sha256: checksum of the dataset manifest, recorded in the file.
        support_split: name of the support split, recorded in the file.
        query_split: name of the query split, recorded in the file.

    Returns:
        The episodes.

    Raises:
        ValueError: non-positive sizes, misaligned keys and labels, duplicate keys, or fewer than ``way``
            classes with enough samples (the message says how many qualify).
    """
    for name, value in (("way", way), ("shot", shot), ("query", query), ("folds", folds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    same_split = query_keys is None
    s_labels = np.asarray(support_labels, dtype=np.int64)
    if len(support_keys) != s_labels.shape[0]:
        raise ValueError(
            f"support_keys ({len(support_keys)}) and support_labels ({s_labels.shape[0]}) differ"
        )
    if len(set(support_keys)) != len(support_keys):
        raise ValueError("support_keys contains duplicate keys")
    if same_split:
        q_keys, q_labels = list(support_keys), s_labels
    else:
        if query_labels is None:
            raise ValueError("query_labels is required with query_keys")
        q_keys, q_labels = list(query_keys or []), np.asarray(query_labels, dtype=np.int64)
        if len(q_keys) != q_labels.shape[0]:
            raise ValueError(f"query_keys ({len(q_keys)}) and query_labels ({q_labels.shape[0]}) differ")
        if len(set(q_keys)) != len(q_keys):
            raise ValueError("query_keys contains duplicate keys")
    num_classes = len(classes)
    for name, labels in (("support_labels", s_labels), ("query_labels", q_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
            )

    def by_class(keys: Sequence[str], labels: np.ndarray) -> list[list[str]]:
        pools: list[list[str]] = [[] for _ in range(num_classes)]
        for key, label in zip(keys, labels.tolist()):
            pools[label].append(key)
        return [sorted(p) for p in pools]

    support_pool = by_class(support_keys, s_labels)
    query_pool = support_pool if same_split else by_class(q_keys, q_labels)
    if same_split:
        eligible = [c for c in range(num_classes) if len(support_pool[c]) >= shot + query]
        need = f"{shot + query} {support_split!r} samples (shot + query)"
    else:
        eligible = [
            c for c in range(num_classes) if len(support_pool[c]) >= shot and len(query_pool[c]) >= query
        ]
        need = f"{shot} {support_split!r} and {query} {query_split!r} samples"
    if len(eligible) < way:
        raise ValueError(
            f"way={way} but only {len(eligible)} of {num_classes} classes have at least {need}; "
            f"lower --way, --shot or --query"
        )
    rng = np.random.default_rng(seed)
    episodes: list[Episode] = []
    for _ in range(folds):
        chosen = [eligible[i] for i in rng.choice(len(eligible), size=way, replace=False)]
        support: list[str] = []
        queries: list[str] = []
        for c in chosen:
            pool = support_pool[c]
            picked = rng.choice(len(pool), size=shot + query if same_split else shot, replace=False)
            support.extend(pool[i] for i in picked[:shot])
            if same_split:
                queries.extend(pool[i] for i in picked[shot:])
            else:
                q_pool = query_pool[c]
                queries.extend(q_pool[i] for i in rng.choice(len(q_pool), size=query, replace=False))
        episodes.append(
            Episode(
                classes=tuple(str(classes[c]) for c in chosen), support=tuple(support), query=tuple(queries)
            )
        )
    return EpisodeSet(
        way=way,
        shot=shot,
        query=query,
        seed=seed,
        manifest_sha256=manifest_sha256,
        classes=tuple(str(c) for c in classes),
        episodes=tuple(episodes),
        support_split=support_split,
        query_split=support_split if same_split else query_split,
    )
