from __future__ import annotations

import hashlib
import json
import statistics

import numpy as np
import pytest

from datapipes.errors import UserError
from finetune.episodes import FORMAT, EpisodeSet, episode_labels, generate_episodes
from finetune.fewshot import FewShotResult, run_fewshot_svm, summarize_folds

CLASSES = ["a", "b", "c", "d", "e", "f"]


def split_data(prefix, per_class, num_classes=6):
    keys = [f"{prefix}{c}_{i:03d}" for c in range(num_classes) for i in range(per_class)]
    labels = np.repeat(np.arange(num_classes), per_class)
    return keys, labels


def make(**overrides):
    s_keys, s_labels = split_data("tr", 12)
    q_keys, q_labels = split_data("te", 8)
    kwargs = {
        "classes": CLASSES,
        "support_keys": s_keys,
        "support_labels": s_labels,
        "query_keys": q_keys,
        "query_labels": q_labels,
        "way": 3,
        "shot": 4,
        "query": 5,
        "folds": 4,
        "seed": 0,
        "manifest_sha256": "ab" * 32,
    }
    kwargs.update(overrides)
    return generate_episodes(**kwargs)


def test_episode_structure_follows_protocol():
    eps = make()
    assert (eps.way, eps.shot, eps.query, eps.folds) == (3, 4, 5, 4)
    for ep in eps.episodes:
        assert len(set(ep.classes)) == 3
        assert len(ep.support) == 12
        assert len(ep.query) == 15
        assert len(set(ep.support)) == 12
        assert len(set(ep.query)) == 15
        for j, key in enumerate(ep.support):
            assert key.startswith("tr")  # support from train
            assert CLASSES[int(key[2])] == ep.classes[j // 4]
        for j, key in enumerate(ep.query):
            assert key.startswith("te")  # queries from test
            assert CLASSES[int(key[2])] == ep.classes[j // 5]
    assert episode_labels(12, 3).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_episodes_are_seeded_and_order_independent():
    a, b = make(seed=7), make(seed=7)
    assert a == b
    assert a.sha256 == b.sha256
    assert make(seed=8).sha256 != a.sha256
    s_keys, s_labels = split_data("tr", 12)
    perm = np.random.default_rng(0).permutation(len(s_keys))
    shuffled = make(seed=7, support_keys=[s_keys[i] for i in perm], support_labels=s_labels[perm])
    assert shuffled == a
    # classes vary across folds
    assert len({ep.classes for ep in make(folds=10).episodes}) > 1


def test_query_from_train_is_disjoint_from_support():
    eps = make(query_keys=None, query_labels=None, query=6)
    assert eps.query_split == eps.support_split == "train"
    for ep in eps.episodes:
        assert not set(ep.support) & set(ep.query)
        assert all(k.startswith("tr") for k in ep.query)


def test_too_few_classes_or_samples():
    with pytest.raises(ValueError, match="only 6 of 6 classes"):
        make(way=7)
    with pytest.raises(ValueError, match="only 0 of 6 classes"):
        make(shot=13)
    with pytest.raises(ValueError, match="only 0 of 6"):
        make(query=9)
    with pytest.raises(ValueError, match="way"):
        make(way=0)


def test_file_roundtrip_and_checksum(tmp_path):
    eps = make()
    path = eps.save(tmp_path / "sub" / "eps.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT == "pcpt-fewshot/1"
    assert data["dataset"] == {"manifest_sha256": "ab" * 32, "classes": CLASSES}
    assert set(data) >= {"way", "shot", "query", "folds", "seed", "episodes", "sha256"}
    rest = {k: v for k, v in data.items() if k != "sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert data["sha256"] == hashlib.sha256(canonical).hexdigest()
    assert EpisodeSet.load(path) == eps
    assert not list(path.parent.glob("*.tmp"))


def test_tampered_or_foreign_files_are_rejected(tmp_path):
    path = make().save(tmp_path / "eps.json")
    data = json.loads(path.read_text())
    data["episodes"][0]["support"][0] = "tr5_000"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        EpisodeSet.load(path)
    path.write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(UserError, match="not a pcpt-fewshot/1"):
        EpisodeSet.load(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        EpisodeSet.load(path)
    with pytest.raises(UserError, match="not found"):
        EpisodeSet.load(tmp_path / "missing.json")


def test_verify_data():
    eps = make()
    s_keys, s_labels = split_data("tr", 12)
    q_keys, q_labels = split_data("te", 8)
    kw = {"classes": CLASSES, "support_keys": s_keys, "support_labels": s_labels}
    assert eps.verify_data(**kw, query_keys=q_keys, query_labels=q_labels, manifest_sha256="ab" * 32) == []
    warnings = eps.verify_data(**kw, query_keys=q_keys, query_labels=q_labels, manifest_sha256="cd" * 32)
    assert len(warnings) == 1
    assert "manifest" in warnings[0]
    used = eps.episodes[0].query[0]
    i = q_keys.index(used)
    with pytest.raises(UserError, match=f"query key '{used}' is not in the 'test' split"):
        eps.verify_data(**kw, query_keys=q_keys[:i] + q_keys[i + 1 :], query_labels=np.delete(q_labels, i))
    relabelled = q_labels.copy()
    relabelled[i] = (relabelled[i] + 1) % 6
    with pytest.raises(UserError, match="has class"):
        eps.verify_data(**kw, query_keys=q_keys, query_labels=relabelled)


def feature_table(split, *, dim=8, spread=0.05, seed=0):
    keys, labels = split
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(6, dim)) * 3
    feats = centers[labels] + rng.normal(size=(len(keys), dim)) * spread
    return {k: f.astype(np.float32) for k, f in zip(keys, feats)}


def test_fewshot_svm_separable_features():
    eps = make()
    support = feature_table(split_data("tr", 12))
    query = feature_table(split_data("te", 8), seed=1)
    result = run_fewshot_svm(eps, support_features=support, query_features=query)
    assert result.fold_accuracies == [1.0] * 4
    assert result.mean == 1.0
    assert result.std == 0.0
    assert result.protocol == "svm"
    assert result.episodes_sha256 == eps.sha256
    assert result.selection.startswith("none")
    json.dumps(result.to_dict())


def test_fewshot_svm_matches_reference_per_episode():
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    eps = make(folds=3)
    support = feature_table(split_data("tr", 12), spread=4.0)
    query = feature_table(split_data("te", 8), spread=4.0, seed=1)
    result = run_fewshot_svm(eps, support_features=support, query_features=query)
    want = []
    for ep in eps.episodes:
        sx = np.stack([support[k] for k in ep.support])
        qx = np.stack([query[k] for k in ep.query])
        sy = np.repeat(np.arange(3), 4)
        qy = np.repeat(np.arange(3), 5)
        scaler = StandardScaler().fit(sx)
        clf = SVC(kernel="linear", C=1.0).fit(scaler.transform(sx), sy)
        want.append(float(np.mean(clf.predict(scaler.transform(qx)) == qy)))
    assert result.fold_accuracies == pytest.approx(want)
    assert result.mean == pytest.approx(statistics.mean(want))
    assert result.std == pytest.approx(statistics.stdev(want))  # sample std, ddof=1


def test_missing_features_are_named():
    eps = make(folds=1)
    with pytest.raises(ValueError, match="no support features"):
        run_fewshot_svm(eps, support_features={}, query_features={})


def test_summary_and_finetune_protocol_fit_the_result_type():
    eps = make(folds=3)
    result = FewShotResult.from_folds(
        eps, [0.9, 0.8, 1.0], protocol="finetune", selection="last epoch", params={"epochs": 150}
    )
    assert result.mean == pytest.approx(0.9)
    assert result.std == pytest.approx(0.1)
    assert result.summary() == "90.00 ± 10.00"
    assert result.to_dict()["folds"] == 3
    with pytest.raises(ValueError, match="fold accuracies"):
        FewShotResult.from_folds(eps, [0.9], protocol="finetune", selection="last epoch")
    assert summarize_folds([0.5]) == (0.5, None)
