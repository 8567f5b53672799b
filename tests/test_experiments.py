"""The experiments on tiny inputs: files appear, values are sane, the approximation error is right."""

from __future__ import annotations

import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from lsr.experiments import approximation, data, loss_shapes, models, outputs, report, train, training  # noqa: E402
from lsr.sparse import PAPER_EPS  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Loss shapes


def test_loss_shape_curves_match_the_definitions():
    p = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    C, xi = 100, 0.1
    torch.testing.assert_close(loss_shapes.exact_target_loss(p, xi, C), -(1 - xi + xi / C) * torch.log(p))
    torch.testing.assert_close(loss_shapes.exact_non_target_loss(p, xi, C), -(xi / C) * torch.log(p))
    torch.testing.assert_close(loss_shapes.ce_non_target_loss(p, xi, C), torch.zeros_like(p))
    torch.testing.assert_close(loss_shapes.sparse_non_target_loss(p, xi, C), torch.zeros_like(p))
    # With the non-target mass spread equally, exact LSR and SparseLSR agree (Jensen is tight).
    torch.testing.assert_close(loss_shapes.exact_row_loss(p, xi, C), loss_shapes.sparse_target_loss(p, xi, C))


def test_seed_snippet_curve_falls_below_zero_near_certainty():
    p = torch.tensor([0.1, 1 - 1e-6], dtype=torch.float64)
    snippet = loss_shapes.seed_snippet_target_loss(p, 0.2, 100)
    assert snippet[1] < 0 < snippet[0]
    assert loss_shapes.sparse_target_loss(p, 0.2, 100)[1] > 0


def test_loss_shape_figures_are_written(tmp_path):
    paths = loss_shapes.make_figures(tmp_path, num_classes=10)
    assert [p.name for p in paths] == ["loss_shapes.png", "seed_snippet_loss.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


# ---------------------------------------------------------------------------------------------
# Approximation error


def _random_rows(rows=6, classes=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    return logits, torch.randint(0, classes, (rows,), generator=gen)


def test_approximation_error_is_exactly_zero_without_smoothing():
    logits, target = _random_rows()
    errors = approximation.approximation_error(logits, target, 0.0)
    assert torch.equal(errors["loss_gap"], torch.zeros_like(errors["loss_gap"]))
    assert torch.equal(errors["grad_rel_l2_error"], torch.zeros_like(errors["grad_rel_l2_error"]))


def test_approximation_error_matches_a_direct_computation():
    logits, target = _random_rows()
    xi = 0.2
    C = logits.shape[1]
    errors = approximation.approximation_error(logits, target, xi)

    # Direct numpy computation from the definitions (exact LSR; equation 15 with its 1e-7).
    z = logits.numpy()
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    p = np.exp(log_p)
    rows = np.arange(len(target))
    y = target.numpy()
    q = np.full_like(p, xi / C)
    q[rows, y] += 1 - xi
    exact = -(q * log_p).sum(1)
    p_y = p[rows, y]
    a, b = 1 - xi + xi / C, xi * (C - 1) / C
    sparse = -a * log_p[rows, y] - b * np.log((1 - p_y + PAPER_EPS) / (C - 1))
    g_exact = p - q
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1
    g_sparse = (onehot - p) * (b * p_y / (1 - p_y + PAPER_EPS) - a)[:, None]

    np.testing.assert_allclose(errors["loss_gap"].numpy(), exact - sparse, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(errors["rel_loss_error"].numpy(), np.abs(exact - sparse) / exact, rtol=1e-9)
    rel = np.linalg.norm(g_sparse - g_exact, axis=1) / np.linalg.norm(g_exact, axis=1)
    cos = (g_sparse * g_exact).sum(1) / np.linalg.norm(g_sparse, axis=1) / np.linalg.norm(g_exact, axis=1)
    np.testing.assert_allclose(errors["grad_rel_l2_error"].numpy(), rel, rtol=1e-8)
    np.testing.assert_allclose(errors["grad_cosine"].numpy(), cos, rtol=1e-8)
    assert (errors["loss_gap"] >= 0).all()  # Jensen: SparseLSR never exceeds exact LSR


def test_loss_gap_is_the_jensen_gap_of_the_non_target_distribution():
    gen = torch.Generator().manual_seed(1)
    C, xi, p_y = 50, 0.1, 0.6
    spread = approximation.non_target_distribution("gaussian σ=3", C - 1, 4, gen)
    errors = approximation.approximation_error(
        approximation.logits_for(p_y, spread), torch.zeros(4, dtype=torch.long), xi
    )
    jensen = xi * (C - 1) / C * (math.log(1 / (C - 1)) - torch.log(spread).mean(dim=1))
    eps_term = xi * (C - 1) / C * (math.log1p(PAPER_EPS / (1 - p_y)))  # the paper's guard
    torch.testing.assert_close(errors["loss_gap"], jensen + eps_term)


def test_equal_spread_is_the_tight_case():
    point = approximation.error_point("t", "equal", 1000, 0.1, 0.7, rows=1)
    assert point.rel_loss_error < 1e-6 and point.grad_rel_l2_error < 1e-6 and point.grad_cosine > 1 - 1e-9


def test_non_target_distributions_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    for kind in approximation.DISTRIBUTIONS:
        r = approximation.non_target_distribution(kind, 30, 3, gen)
        torch.testing.assert_close(r.sum(dim=1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown"):
        approximation.non_target_distribution("nope", 3, 1, gen)


def test_approximation_sweep_writes_csv_and_charts(tmp_path):
    points = approximation.sweep_points(
        class_counts=(2, 10), smoothing_values=(0.05, 0.2), confidences=(0.3, 0.9), rows=2
    )
    csv_path = approximation.write_csv(points, tmp_path / "a.csv")
    assert approximation.read_csv(csv_path) == points
    for sweep in approximation.SWEEP_AXES:
        assert approximation.plot_sweep(points, sweep, tmp_path / f"{sweep}.png").stat().st_size > 10_000
    for p in points:
        assert p.loss_gap >= 0 and -1 <= p.grad_cosine <= 1 + 1e-12
        if p.num_classes == 2:  # one non-target class: nothing for Jensen to lose
            assert p.rel_loss_error < 1e-6


# ---------------------------------------------------------------------------------------------
# Training


def test_expected_calibration_error():
    labels = torch.tensor([0, 1, 0, 1])
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert training.expected_calibration_error(perfect, labels) == 0.0
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert training.expected_calibration_error(wrong, labels) == pytest.approx(1.0)


def test_summary_table_shows_mean_and_spread():
    row = {"label": "CE", "seeds": 2} | {f"{m}_mean": 0.5 for m in training.METRIC_NAMES}
    one_seed = row | {"seeds": 1} | {f"{m}_std": math.nan for m in training.METRIC_NAMES}
    two_seeds = row | {f"{m}_std": 0.25 for m in training.METRIC_NAMES}
    lines = outputs.summary_table([one_seed, two_seeds]).splitlines()
    assert lines[0].startswith("| loss | seeds | test accuracy (%) | ECE (%) |")
    assert lines[1] == "|---|" + "---:|" * 8
    assert lines[2] == "| CE | 1 | 50.00 | 50.00 | 0.500 | 0.50 | 0.5 | 0.5000 | 0.500 |"
    assert lines[3].startswith("| CE | 2 | 50.00 ± 25.00 | 50.00 ± 25.00 | 0.500 ± 0.250 |")


def test_lsr_train_on_tiny_digits(tmp_path, capsys):
    paths = train.run_command(
        ["--max-train", "200", "--max-test", "80", "--epochs", "1", "--seeds", "0", "1"]
        + ["--losses", "ce", "lsr", "sparse", "--out", str(tmp_path)]
    )
    assert {p.name for p in paths.values()} == {
        "train_digits_runs.csv",
        "train_digits_summary.json",
        "train_digits_summary.md",
        "train_digits_tsne.png",
    }
    with paths["runs"].open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["loss"], r["seed"]) for r in runs] == [
        (n, s) for n in ("ce", "lsr", "sparse") for s in ("0", "1")
    ]
    for r in runs:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["ece"]) <= 1.0
        assert float(r["nll"]) > 0 and float(r["ms_per_step"]) > 0 and float(r["warmup_ms"]) > 0
    summary = json.loads(paths["summary_json"].read_text())
    assert [row["seeds"] for row in summary["summary"]] == [2, 2, 2]
    meta = summary["meta"]
    assert meta["dataset"] == "digits" and meta["tsne_file"] == "train_digits_tsne.png"
    assert meta["torch_version"] == torch.__version__ and meta["command"].startswith("lsr-train ")
    assert {"cpu_model", "vector_isa", "git_commit", "threads", "epochs", "seeds"} <= meta.keys()
    assert "lsr-train --max-train 200" in paths["summary_md"].read_text()
    assert "test accuracy" in capsys.readouterr().err  # the progress bar
    # The README reads these results and a small approximation sweep.
    points = approximation.sweep_points(
        class_counts=(2, 1000), smoothing_values=(0.1,), confidences=(0.3, 0.9), rows=2
    )
    approximation.write_csv(points, tmp_path / "approximation_error.csv")
    readme = report.write_readme(tmp_path).read_text()
    assert "## Training comparison: digits" in readme and "Reading the charts" in readme
    assert "SparseLSR against exact LSR on the trained models" in readme
    # Same seed, same initial weights and batches: CE runs repeat exactly.
    again = train.run_command(
        ["--max-train", "200", "--max-test", "80", "--epochs", "1", "--seeds", "0"]
        + ["--losses", "ce", "--no-progress", "--out", str(tmp_path / "again")]
    )
    with again["runs"].open() as f:
        assert next(csv.DictReader(f))["nll"] == runs[0]["nll"]
    assert "seed 0" not in capsys.readouterr().err  # --no-progress


def test_unknown_loss_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.main(["--losses", "nope"])
    assert "unknown or unavailable loss" in capsys.readouterr().err


def test_cifar10_missing_files_error_says_where_to_put_them(tmp_path, capsys):
    with pytest.raises(data.Cifar10NotFoundError, match="cifar-10-python.tar.gz") as info:
        data.find_cifar10_dir(tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "downloads nothing" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "data_batch_1" in capsys.readouterr().err


def _fake_cifar10(folder, per_batch=16):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": list(range(10)) + [0] * (per_batch - 10),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)


def test_cifar10_loader_and_alexnet_on_fake_batches(tmp_path):
    _fake_cifar10(tmp_path / data.CIFAR10_FOLDER)
    cifar = data.load_cifar10_dataset(tmp_path, max_train=40)
    assert cifar.x_train.shape == (40, 3, 32, 32) and cifar.x_test.shape == (16, 3, 32, 32)
    assert cifar.num_classes == 10 and cifar.augment
    augmented = data.augment_batch(cifar.x_train[:4], torch.Generator().manual_seed(0))
    assert augmented.shape == (4, 3, 32, 32)
    model = models.AlexNet()
    logits, features = training.predict(model, cifar.x_test, torch.device("cpu"))
    assert logits.shape == (16, 10) and features.shape == (16, 4096)


def test_interrupted_experiments_leave_the_results_as_they_were(tmp_path, monkeypatch, capsys):
    from lsr.experiments import __main__ as experiments_main

    out = tmp_path / "experiments"
    out.mkdir()
    (out / "README.md").write_text("committed\n")
    (out / "train_digits_summary.json").write_text("{}\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(approximation, "make_outputs", interrupted)  # after the loss-shape figures
    with pytest.raises(SystemExit) as exit_info:
        experiments_main.main(["--out", str(out), "--skip-train"])
    assert exit_info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "train_digits_summary.json"]
    assert (out / "README.md").read_text() == "committed\n"
    assert [p.name for p in tmp_path.iterdir()] == ["experiments"]  # no staging folder left behind


def test_missing_packages_are_named_with_the_extra_before_anything_runs(monkeypatch, tmp_path, capsys):
    from lsr.experiments import __main__ as experiments_main

    monkeypatch.setattr(experiments_main.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        experiments_main.main(["--out", str(tmp_path / "out")])
    assert "needs scikit-learn, matplotlib, psutil, tqdm" in str(exit_.value.code)
    assert "'.[experiments]'" in str(exit_.value.code) and not (tmp_path / "out").exists()
