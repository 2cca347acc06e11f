from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from finetune.probes import ProbeResult, knn_probe, stratified_split, svm_probe
from pretrain.knn import knn_predict


def blobs(rng, n_per_class, num_classes, dim=16, spread=1.0):
    centers = rng.normal(size=(num_classes, dim)) * 3.0
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + rng.normal(size=(y.size, dim)) * spread
    return x.astype(np.float32), y


# ------------------------------------------------------------------------------------------ stratified split


def test_stratified_split_partitions_per_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    fit, val = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(labels.size))
    assert Counter(labels[val].tolist()) == {0: 2, 1: 1, 3: 1}
    assert 2 in labels[fit]  # a singleton class stays in fit
    fit2, val2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(val, val2)
    assert np.array_equal(fit, fit2)
    _, val3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(val, val3)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)


# ----------------------------------------------------------------------------------------------------- svm


def reference_svm(train_x, train_y, test_x, test_y, grid, fraction, seed):
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    fit, val = stratified_split(train_y, fraction, seed)
    scores = {}
    for c in grid:
        scaler = StandardScaler().fit(train_x[fit])
        clf = LinearSVC(C=c, max_iter=5000, random_state=seed).fit(
            scaler.transform(train_x[fit]), train_y[fit]
        )
        scores[c] = np.mean(clf.predict(scaler.transform(train_x[val])) == train_y[val])
    best = max(scores.values())
    chosen = min(c for c in grid if scores[c] == best)
    scaler = StandardScaler().fit(train_x)
    clf = LinearSVC(C=chosen, max_iter=5000, random_state=seed).fit(scaler.transform(train_x), train_y)
    return chosen, scores, np.mean(clf.predict(scaler.transform(test_x)) == test_y)


def test_svm_probe_matches_reference_and_reports_selection():
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 30, 4, spread=2.5)
    tx, ty = blobs(np.random.default_rng(0), 10, 4, spread=2.5)
    grid = (0.001, 0.1, 10.0)
    result = svm_probe(x, y, tx, ty, c_grid=grid, val_fraction=0.25, seed=1)
    chosen, scores, acc = reference_svm(x, y, tx, ty, grid, 0.25, 1)
    assert result.params["C"] == chosen
    assert result.val_accuracy == pytest.approx({f"{c:g}": s for c, s in scores.items()})
    assert result.accuracy == pytest.approx(acc)
    assert (result.n_train, result.n_val, result.n_test) == (120, 32, 40)
    assert "hold-out of train" in result.selection
    assert result.protocol == "svm"
    assert result.seed == 1


def test_svm_probe_never_looks_at_test_for_selection():
    rng = np.random.default_rng(1)
    x, y = blobs(rng, 25, 3, spread=3.0)
    tx, ty = blobs(rng, 10, 3, spread=3.0)
    a = svm_probe(x, y, tx, ty, seed=0)
    b = svm_probe(x, y, tx[::-1] * 5.0, rng.permutation(ty), seed=0)
    assert a.params["C"] == b.params["C"]
    assert a.val_accuracy == b.val_accuracy


def test_svm_probe_separable_and_single_c():
    rng = np.random.default_rng(2)
    x, y = blobs(rng, 20, 5, spread=0.1)
    tx, ty = blobs(np.random.default_rng(2), 6, 5, spread=0.1)
    result = svm_probe(x, y, tx, ty, c_grid=(1.0,))
    assert result.accuracy == 1.0
    assert result.n_val == 0
    assert result.val_accuracy == {}
    assert result.selection.startswith("none")
    json.dumps(result.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"c_grid": ()}, "c_grid"), ({"c_grid": (0.0, 1.0)}, "c_grid"), ({"val_fraction": 0.0}, "val_fraction")],
)
def test_svm_probe_rejects_bad_arguments(kwargs, match):
    x, y = blobs(np.random.default_rng(0), 5, 2)
    with pytest.raises(ValueError, match=match):
        svm_probe(x, y, x, y, **kwargs)


def test_svm_probe_rejects_malformed_arrays():
    x, y = blobs(np.random.default_rng(0), 5, 2)
    with pytest.raises(ValueError, match="train_y"):
        svm_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="width"):
        svm_probe(x, y, x[:, :3], y)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        svm_probe(bad, y, x, y)


# ----------------------------------------------------------------------------------------------------- knn


def reference_knn(train_x, train_y, test_x, k, metric="cosine", vote="majority"):
    """One query at a time with Python sorting and Counter."""
    preds = []
    for q in test_x:
        sims = []
        for i, r in enumerate(train_x):
            if metric == "cosine":
                s = float(np.dot(q, r) / (np.linalg.norm(q) * np.linalg.norm(r)))
            else:
                s = -float(np.sum((q - r) ** 2))
            sims.append((s, i))
        top = sorted(sims, key=lambda t: -t[0])[:k]
        if vote == "weighted":
            weights: dict[int, float] = {}
            for s, i in top:
                weights[int(train_y[i])] = weights.get(int(train_y[i]), 0.0) + float(np.exp(s / 0.07))
            preds.append(max(sorted(weights), key=lambda c: weights[c]))
            continue
        counts = Counter(int(train_y[i]) for _, i in top)
        sums: dict[int, float] = {}
        for s, i in top:
            sums[int(train_y[i])] = sums.get(int(train_y[i]), 0.0) + s
        best = max(counts.values())
        tied = sorted(c for c in counts if counts[c] == best)
        preds.append(max(tied, key=lambda c: (sums[c], -c)))
    return np.array(preds)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize(
    ("metric", "vote"), [("cosine", "majority"), ("euclidean", "majority"), ("cosine", "weighted")]
)
def test_knn_predict_matches_reference(backend, metric, vote):
    rng = np.random.default_rng(5)
    train_x, train_y = blobs(rng, 15, 6, dim=8, spread=3.0)
    test_x, _ = blobs(rng, 5, 6, dim=8, spread=3.0)
    got = knn_predict(train_x, train_y, test_x, k=7, metric=metric, vote=vote, backend=backend)
    want = reference_knn(train_x, train_y, test_x, 7, metric=metric, vote=vote)
    assert np.array_equal(got, want)


def test_knn_backends_agree_on_larger_set():
    rng = np.random.default_rng(6)
    train_x, train_y = blobs(rng, 60, 10, dim=32, spread=4.0)
    test_x, _ = blobs(rng, 20, 10, dim=32, spread=4.0)
    a = knn_predict(train_x, train_y, test_x, k=20, backend="faiss")
    b = knn_predict(train_x, train_y, test_x, k=20, backend="torch")
    assert np.array_equal(a, b)


def test_knn_majority_tie_break_by_similarity():
    # query at angle 0; class 1 neighbour nearer than class 0 neighbour -> 1-1 vote, class 1 wins
    train_x = np.array([[1.0, 0.5], [1.0, 0.1], [-1.0, 0.0]], dtype=np.float32)
    train_y = np.array([0, 1, 2])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    for backend in ("faiss", "torch"):
        assert knn_predict(train_x, train_y, query, k=2, backend=backend).tolist() == [1]
        # a clear majority beats similarity
        assert knn_predict(
            np.vstack([train_x, [[1.0, 0.6]]]), np.array([0, 1, 2, 0]), query, k=3, backend=backend
        ).tolist() == [0]


def test_knn_probe_result_and_k_clipping():
    rng = np.random.default_rng(7)
    x, y = blobs(rng, 4, 3, spread=0.05)
    tx, ty = blobs(np.random.default_rng(7), 2, 3, spread=0.05)
    result = knn_probe(x, y, tx, ty, k=3)
    assert isinstance(result, ProbeResult)
    assert result.accuracy == 1.0
    assert result.protocol == "knn"
    assert result.n_val == 0
    assert result.selection.startswith("none")
    clipped = knn_probe(x, y, tx, ty, k=100)
    assert clipped.params["k"] == 12
    json.dumps(clipped.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must"),
        ({"metric": "dot"}, "metric"),
        ({"backend": "x"}, "backend"),
        ({"vote": "x"}, "vote"),
    ],
)
def test_knn_rejects_bad_options(kwargs, match):
    x, y = blobs(np.random.default_rng(0), 3, 2)
    with pytest.raises(ValueError, match=match):
        knn_predict(x, y, x, **kwargs)


# ------------------------------------------------------------------------------------------- data contract


def test_check_data_contract():
    from datapipes.errors import UserError
    from finetune.contract import check_data_contract

    meta = {"data_contract": {"num_points": 1024, "normalization": "unit_sphere"}}
    assert check_data_contract(meta, 1024, "unit_sphere") == []
    with pytest.raises(UserError, match="trained on 1024 points"):
        check_data_contract(meta, 2048, "unit_sphere")
    warnings = check_data_contract(meta, 2048, "unit_sphere", allow_num_points_change=True)
    assert len(warnings) == 1
    assert "2048" in warnings[0]
    with pytest.raises(UserError, match="normalization 'unit_sphere'"):
        check_data_contract(meta, 1024, "none")
    assert "does not record" in check_data_contract(meta, 1024, None)[0]
    with pytest.raises(UserError, match="no data_contract"):
        check_data_contract({}, 1024, None)
