"""SeparabilityPooling on data that do not fit in memory or in one process: memmaps read batch by
batch, re-iterable batches (a DataLoader), and two processes reducing their statistics with
torch.distributed (gloo). Every fit is compared with the in-memory fit on all the data."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import separability_reference as ref
from skpool import SeparabilityPooling
from skpool._sklearn import _validation

PARAMS = dict(alpha=0.7, n_components=2, device="cpu")


def make_maps(rng, n_samples=45, grid=(5, 6), n_channels=3, n_classes=3):
    """Maps (n, H, W, C) with class-dependent means, far from standardised."""
    labels = np.arange(n_samples) % n_classes
    class_means = rng.normal(size=(n_classes, *grid, n_channels))
    maps = class_means[labels] + rng.normal(size=(n_samples, *grid, n_channels))
    return 4.0 * maps + 2.0, labels


def assert_same_fit(actual, expected, atol=1e-10):
    np.testing.assert_allclose(actual.operator_, expected.operator_, rtol=0, atol=atol)
    np.testing.assert_allclose(actual.eigenvalues_, expected.eigenvalues_, rtol=atol)
    np.testing.assert_allclose(actual.channel_mean_, expected.channel_mean_, rtol=atol)
    np.testing.assert_allclose(actual.channel_scale_, expected.channel_scale_, rtol=atol)
    np.testing.assert_array_equal(actual.classes_, expected.classes_)
    assert actual.grid_shape_ == expected.grid_shape_
    assert actual.output_shape_ == expected.output_shape_
    assert actual.n_features_in_ == expected.n_features_in_
    assert actual.n_channels_in_ == expected.n_channels_in_


def mapped_resident_kib(path) -> int | None:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps), or None."""
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def read_only_memmap(path, array) -> np.memmap:
    """``array`` written to a file at ``path``, mapped back read-only (a shared mapping)."""
    mapped = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    mapped[:] = array
    mapped.flush()
    del mapped
    return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)


# ------------------------------------------------------------------------------ memmaps
@pytest.mark.parametrize("normalize", [True, False])
def test_memmap_is_read_in_batches_and_equals_the_in_memory_fit(
    rng, tmp_path, monkeypatch, normalize
):
    maps, labels = make_maps(rng, n_samples=60)
    path = tmp_path / "maps.dat"
    mapped = read_only_memmap(path, maps)

    reads = []
    original = _validation._to_tensor

    def spy(values, dtype, device):
        if isinstance(values, np.ndarray):
            reads.append((values.shape[0], np.shares_memory(values, mapped)))
        return original(values, dtype, device)

    monkeypatch.setattr(_validation, "_to_tensor", spy)
    expected = SeparabilityPooling(**PARAMS, normalize_channels=normalize).fit(maps, labels)
    reads.clear()
    pool = SeparabilityPooling(**PARAMS, normalize_channels=normalize, batch_size=8)
    pool.fit(mapped, labels)
    assert_same_fit(pool, expected)
    # Every read is one batch, straight from the mapping (no copy of the whole array first).
    passes = 2 if normalize else 1
    assert len(reads) == passes * 8 and all(size <= 8 and shared for size, shared in reads)
    # ... and the mapping's pages were released: the file is not left resident.
    resident = mapped_resident_kib(path)
    if resident is not None:
        assert resident * 1024 < 8 * maps[0].nbytes
    np.testing.assert_allclose(pool.transform(mapped), expected.transform(maps), atol=1e-10)


def test_float32_memmap_and_private_memmap(rng, tmp_path):
    maps, labels = make_maps(rng)
    maps = maps.astype(np.float32)
    np.save(tmp_path / "maps.npy", maps)
    expected = SeparabilityPooling(**PARAMS, dtype="float64").fit(maps, labels)
    for mode in ("r", "c"):  # "c" (copy-on-write) pages are never dropped: they may be modified
        mapped = np.load(tmp_path / "maps.npy", mmap_mode=mode)
        assert isinstance(mapped, np.memmap)
        fitted = SeparabilityPooling(**PARAMS, dtype="float64", batch_size=7).fit(mapped, labels)
        assert_same_fit(fitted, expected)


# ------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("dtype,atol", [("float64", 1e-10), ("float32", 1e-5)])
def test_dataloader_fit_equals_in_memory_fit(rng, shuffle, dtype, atol):
    maps, labels = make_maps(rng)
    expected = SeparabilityPooling(**PARAMS, dtype=dtype).fit(maps, labels)
    dataset = TensorDataset(torch.from_numpy(maps), torch.from_numpy(labels))
    loader = DataLoader(dataset, batch_size=7, shuffle=shuffle)  # a different order per pass
    pool = SeparabilityPooling(**PARAMS, dtype=dtype, batch_size=3).fit_batches(loader)
    assert_same_fit(pool, expected, atol)
    np.testing.assert_allclose(pool.transform(maps), expected.transform(maps), atol=100 * atol)


def test_batches_of_stacks_with_grid_shape_and_string_labels(rng):
    maps, labels = make_maps(rng)
    names = np.array(["cat", "dog", "eel"])[labels]
    stacks = maps.reshape(len(maps), 30, 3)
    expected = SeparabilityPooling(**PARAMS, grid_shape=(5, 6)).fit(stacks, names)
    # Uneven batches, the first without "eel", labels as plain lists.
    cuts = [0, 2, 11, 12, 30, 45]
    batches = [(stacks[a:b], list(names[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    assert "eel" not in batches[0][1]
    pool = SeparabilityPooling(**PARAMS, grid_shape=(5, 6)).fit_batches(batches)
    assert_same_fit(pool, expected)
    np.testing.assert_array_equal(pool.classes_, ["cat", "dog", "eel"])


def test_flat_batches_and_memmap_slices(rng, tmp_path):
    maps, labels = make_maps(rng)
    flat = maps.reshape(len(maps), -1)
    expected = SeparabilityPooling(**PARAMS, grid_shape=(5, 6)).fit(flat, labels)
    np.save(tmp_path / "flat.npy", flat)
    mapped = np.load(tmp_path / "flat.npy", mmap_mode="r")

    def read_chunks():  # a callable returning a fresh iterator, as for files read in chunks
        for start in range(0, len(mapped), 10):
            yield mapped[start : start + 10], labels[start : start + 10]

    pool = SeparabilityPooling(**PARAMS, grid_shape=(5, 6)).fit_batches(read_chunks)
    assert_same_fit(pool, expected)
    assert pool.n_features_in_ == 90 and pool.n_channels_in_ == 3


def test_one_shot_iterators_are_refused_clearly(rng):
    maps, labels = make_maps(rng)
    generator = ((maps[i : i + 5], labels[i : i + 5]) for i in range(0, 45, 5))
    with pytest.raises(TypeError, match="one-shot iterator.*reads the data twice.*callable"):
        SeparabilityPooling(**PARAMS).fit_batches(generator)
    with pytest.raises(TypeError, match="one-shot"):
        SeparabilityPooling(**PARAMS).fit_batches(iter([(maps, labels)]))
    with pytest.raises(TypeError, match="re-iterable"):
        SeparabilityPooling(**PARAMS).fit_batches(3)


def test_bad_batches_are_rejected_clearly(rng):
    maps, labels = make_maps(rng)
    other, other_labels = make_maps(rng, grid=(5, 5))
    cases = [
        ([], ValueError, "no \\(X_batch, y_batch\\)"),
        ([maps], TypeError, "Batch 0 is not a pair"),
        ([(maps, labels), (other, other_labels)], ValueError, "Batch 1 has a 5x5 grid"),
        ([(maps, labels[:5])], ValueError, "5 labels but X has 45 samples"),
        ([(maps, np.zeros(45))], ValueError, "two classes"),
        ([(maps, labels), (maps[:2] * np.nan, labels[:2])], ValueError, "NaN"),
    ]
    for batches, error, match in cases:
        with pytest.raises(error, match=match):
            SeparabilityPooling(**PARAMS).fit_batches(batches)


def test_batches_that_change_between_passes_are_detected(rng):
    maps, labels = make_maps(rng)
    calls = []

    def drifting():  # the second pass drops samples, as drop_last with shuffling would
        calls.append(1)
        stop = 45 if len(calls) == 1 else 40
        return iter([(maps[:stop], labels[:stop])])

    with pytest.raises(ValueError, match="changed between the two passes"):
        SeparabilityPooling(**PARAMS).fit_batches(drifting)
    calls.clear()

    def relabelled():
        calls.append(1)
        return iter([(maps, labels if len(calls) == 1 else labels + 5)])

    with pytest.raises(ValueError, match="second pass .* but not in the first"):
        SeparabilityPooling(**PARAMS).fit_batches(relabelled)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_fit_batches_and_its_transform_check_batch_size_set_after_fit(rng, batch_size):
    """A batch size set after construction is checked by every method that uses it."""
    maps, labels = make_maps(rng)
    pool = SeparabilityPooling(**PARAMS).fit_batches([(maps, labels)])
    pool.set_params(batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        pool.fit_batches([(maps, labels)])
    with pytest.raises(ValueError, match="batch_size"):
        pool.transform(maps)


def test_fit_batches_of_huge_float64_maps_equals_fit(rng):
    """Maps of magnitude 1e300 streamed in batches: the channel statistics are merged without
    squaring anything out of range, so fit_batches equals fit (as for unit maps: 1e-10)."""
    maps, labels = make_maps(rng)
    maps = maps * 1e300
    expected = SeparabilityPooling(**PARAMS).fit(maps, labels)
    pool = SeparabilityPooling(**PARAMS, batch_size=4).fit_batches(
        [(maps[i : i + 10], labels[i : i + 10]) for i in range(0, 45, 10)]
    )
    assert np.all(np.isfinite(pool.channel_scale_))
    assert_same_fit(pool, expected)


def test_failed_fit_batches_leaves_previous_fit_untouched(rng):
    maps, labels = make_maps(rng)
    pool = SeparabilityPooling(**PARAMS).fit(maps, labels)
    before = pool.operator_.copy()
    with pytest.raises(ValueError):
        pool.fit_batches([(maps[:, :4], labels), (maps, labels)])
    np.testing.assert_array_equal(pool.operator_, before)  # exact: the same array, restored
    assert pool.grid_shape_ == (5, 6)


def test_distributed_without_process_group_is_a_clear_error(rng):
    maps, labels = make_maps(rng, n_samples=6)
    with pytest.raises(ValueError, match="init_process_group"):
        SeparabilityPooling(**PARAMS, distributed=True).fit(maps, labels)


# ---------------------------------------------------------------------- two processes
WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    rank, folder = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2
    )
    from skpool import SeparabilityPooling
    from skpool._core import distributed
    from skpool._core.scatter import ChannelStatistics, ScatterStatistics

    data = np.load(f"{folder}/data.npz")
    part = slice(0, int(data["cut"])) if rank == 0 else slice(int(data["cut"]), None)
    X, y = data["X"][part], data["y"][part]
    params = dict(alpha=0.7, n_components=2, device="cpu", distributed=True)
    results = {}
    # The core reductions, on raw stacks far from zero (a test of the centred reduction).
    raw = torch.as_tensor(X.reshape(len(X), -1, X.shape[-1]) + 1e6)
    weights = torch.as_tensor(1.0 / np.bincount(data["y"]))
    stats = ScatterStatistics.from_batch(raw, torch.as_tensor(y), weights)
    stats = distributed.all_reduce_scatter_statistics(stats)
    channels = distributed.all_reduce_channel_statistics(ChannelStatistics.from_batch(raw))
    results.update(within=stats.within, means=stats.means, counts=stats.counts,
                   channel_mean=channels.mean, channel_scale=channels.scale)
    # Magnitude 1e300: a reduction of sums of squares would overflow.
    huge = torch.as_tensor(X.reshape(len(X), -1, X.shape[-1]) * 1e300)
    huge = distributed.all_reduce_channel_statistics(ChannelStatistics.from_batch(huge))
    results.update(huge_mean=huge.mean, huge_scale=huge.scale)
    pool = SeparabilityPooling(**params, dtype="float32").fit(X, y)
    results["fit32_operator_"] = pool.operator_
    pool = SeparabilityPooling(**params, batch_size=4).fit(X, y)
    for name in ("operator_", "eigenvalues_", "channel_mean_", "channel_scale_", "classes_"):
        results["fit_" + name] = getattr(pool, name)
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=6)
    pool = SeparabilityPooling(**params, support_radius=2.0).fit_batches(loader)
    results["batches_operator_"] = pool.operator_
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan if rank == 1 else bad[0, 0, 0, 0]
    one_shot = iter(loader) if rank == 1 else loader
    for name, fit in [
        ("error", lambda: SeparabilityPooling(**params).fit(bad, y)),
        ("batches_error", lambda: SeparabilityPooling(**params).fit_batches(one_shot)),
    ]:
        try:  # rank 1 fails before any statistics: both ranks must raise, neither may hang
            fit()
            results[name] = np.array("")
        except Exception as exc:
            results[name] = np.array(f"{type(exc).__name__}: {exc}")
    np.savez(f"{folder}/rank{rank}.npz", **results)
    dist.destroy_process_group()
    """
)


def test_two_gloo_processes_equal_the_single_process_fit(rng, tmp_path):
    maps, labels = make_maps(rng, n_samples=41, grid=(5, 5))
    order = np.argsort(labels == 2, kind="stable")  # rank 0 gets no sample of class 2
    maps, labels = maps[order], labels[order]
    np.savez(tmp_path / "data.npz", X=maps, y=labels, cut=20)
    assert 2 not in labels[:20]
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(rank), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=120)[0].decode() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    expected = SeparabilityPooling(**PARAMS).fit(maps, labels)
    truncated = SeparabilityPooling(**PARAMS, support_radius=2.0).fit(maps, labels)
    stacks = maps.reshape(41, 25, 3)
    _, within = ref.scatter_matrices(stacks, labels)  # the reference, without the 1e6 offset
    class_means = np.stack([stacks[labels == q].mean(axis=0) for q in range(3)])
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_allclose(result["within"], within, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(result["means"] - 1e6, class_means, atol=1e-8)
        np.testing.assert_array_equal(result["counts"], np.bincount(labels))
        channel_mean = result["channel_mean"] - 1e6
        np.testing.assert_allclose(channel_mean, stacks.mean(axis=(0, 1)), atol=1e-8)
        np.testing.assert_allclose(result["channel_scale"], stacks.std(axis=(0, 1)), rtol=1e-8)
        np.testing.assert_allclose(result["fit_operator_"], expected.operator_, rtol=0, atol=1e-10)
        np.testing.assert_allclose(result["fit_eigenvalues_"], expected.eigenvalues_, rtol=1e-10)
        np.testing.assert_allclose(result["fit_channel_mean_"], expected.channel_mean_, rtol=1e-10)
        np.testing.assert_allclose(
            result["fit_channel_scale_"], expected.channel_scale_, rtol=1e-10
        )
        np.testing.assert_array_equal(result["fit_classes_"], [0, 1, 2])
        np.testing.assert_allclose(result["batches_operator_"], truncated.operator_, atol=1e-10)
        # 1e-12 relative: sums of about 1000 terms each side (count u ~ 1e-13), as for unit data
        np.testing.assert_allclose(result["huge_mean"], stacks.mean(axis=(0, 1)) * 1e300,
                                   rtol=1e-12)
        np.testing.assert_allclose(result["huge_scale"], stacks.std(axis=(0, 1)) * 1e300,
                                   rtol=1e-12)
        # float32 solve on both ranks: float32 throughout (the reduced scatter keeps the
        # solve's dtype) and within the README's 1e-3 of the float64 operator
        assert result["fit32_operator_"].dtype == np.float32
        ref.assert_same_rows(result["fit32_operator_"], expected.operator_, 1e-3)
    cases = [("error", "ValueError", "NaN"), ("batches_error", "TypeError", "one-shot")]
    for name, error, match in cases:
        messages = [str(np.load(tmp_path / f"rank{rank}.npz")[name]) for rank in range(2)]
        assert messages[0].startswith("RuntimeError") and "rank 1" in messages[0]
        assert match in messages[0] and messages[1].startswith(error) and match in messages[1]


def test_gmp_transform_of_a_memmap_reads_batches_and_releases_pages(rng, tmp_path):
    """GeneralizedMaxPooling.transform over a memmap: the in-memory result, and the file's
    pages are released after each batch (not left resident after the pass)."""
    from skpool import GeneralizedMaxPooling

    maps = rng.normal(size=(64, 16, 16, 8))
    path = tmp_path / "gmp.dat"
    mapped = read_only_memmap(path, maps)
    pool = GeneralizedMaxPooling(lam=1.0, batch_size=8)
    got = pool.fit_transform(mapped)
    resident = mapped_resident_kib(path)
    if resident is not None:
        assert resident * 1024 < 8 * maps[0].nbytes
    np.testing.assert_allclose(got, pool.transform(maps), atol=1e-12)
