"""Dataset discovery, per-class samples, crops through fastsam3d.geometry, seeded augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsam3d_distill.data import (
    CropDataset,
    TensorCropDataset,
    discover,
    index_samples,
    load_array,
    read_list_file,
)
from fastsam3d_distill.synthetic import make_phantom, write_nifti, write_nnunet_dataset

SHAPE = (40, 48, 56)
SPACING = (2.0, 1.5, 3.0)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    write_nnunet_dataset(root, n_cases=2, shape=SHAPE, spacing=SPACING, oblique_deg=15)
    return root


def test_phantom_round_trips_through_nifti_and_monai(tmp_path):
    ph = make_phantom(shape=SHAPE, spacing=SPACING, oblique_deg=20, seed=1)
    write_nifti(ph, tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    img, aff = load_array(tmp_path / "i.nii.gz")
    lab, _ = load_array(tmp_path / "l.nii.gz")
    assert img.shape == SHAPE and np.allclose(img, ph.image) and np.allclose(aff, ph.affine)
    assert np.array_equal(np.rint(lab).astype(np.int16), ph.label)
    assert len(np.unique(ph.label)) >= 3  # background + ellipsoids + tube


def test_nnunet_layout_and_list_file_find_the_same_cases(dataset_dir, tmp_path):
    cases = discover(dataset_dir)
    assert [c.name for c in cases] == ["case_000", "case_001"]
    lst = tmp_path / "list.txt"
    lst.write_text("# image label\n" + "\n".join(f"{c.image}\t{c.label}" for c in cases) + "\n")
    assert [(c.image, c.label) for c in read_list_file(lst)] == [(c.image, c.label) for c in cases]


def test_missing_label_is_an_error_naming_the_case(tmp_path):
    write_nnunet_dataset(tmp_path, n_cases=1, shape=(16, 16, 16))
    (tmp_path / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_000"):
        discover(tmp_path)


def test_samples_are_per_class_with_sizes_and_index_cache(dataset_dir, tmp_path):
    cases = discover(dataset_dir)
    cache = tmp_path / "index.json"
    samples = index_samples(cases, cache=cache)
    lab, _ = load_array(cases[0].label)
    values = sorted(int(v) for v in np.unique(lab) if v != 0)
    assert [s.value for s in samples if s.case == 0] == values
    assert all(s.voxels == int((np.rint(lab) == s.value).sum()) for s in samples if s.case == 0)
    assert cache.exists() and index_samples(cases, cache=cache) == samples
    big = index_samples(cases, min_voxels=10**9)
    assert big == []


def test_crop_is_centred_on_the_structure_at_1p5mm(dataset_dir):
    cases = discover(dataset_dir)
    samples = index_samples(cases)
    ds = CropDataset(cases, samples)
    s = max(samples, key=lambda s: s.voxels)
    item = ds.get(samples.index(s))
    img, lab = item["image"], item["label"]
    assert img.shape == lab.shape == (1, 128, 128, 128)
    # Volume is preserved across the resampling to 1.5 mm (voxel volume 2*1.5*3 = 9 mm^3).
    expected = s.voxels * np.prod(SPACING) / 1.5**3
    assert abs(float(lab.sum()) - expected) < 0.15 * expected
    centre = torch.nonzero(lab[0]).float().mean(0)
    assert torch.all((centre - 63.5).abs() < 3), centre
    # z-normalised over the voxels > 0 of the raw crop: the body has mean ~0, std ~1.
    assert torch.isfinite(img).all() and float(img.std()) > 0.1


def test_augmentation_depends_only_on_seed_epoch_and_sample(crops):
    images, labels = crops
    ds = TensorCropDataset(images, labels, augment=True, seed=7)
    a, b = ds.get(1, epoch=3), ds.get(1, epoch=3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    others = [ds.get(1, epoch=e) for e in range(4, 10)]
    assert any(not torch.equal(a["image"], o["image"]) for o in others)
    # Flips move image and label together; intensity jitter leaves the label binary.
    for o in others:
        assert set(torch.unique(o["label"]).tolist()) <= {0.0, 1.0}
        assert float(o["label"].sum()) == float(labels[1].sum())


def test_corner_anchored_lattice_gives_the_same_structure(dataset_dir):
    cases = discover(dataset_dir)
    samples = index_samples(cases)
    i = max(range(len(samples)), key=lambda n: samples[n].voxels)
    a = CropDataset(cases, samples).get(i)["label"]
    b = CropDataset(cases, samples, anchor="corner").get(i)["label"]
    # The two torchio lattice variants differ by under one 1.5 mm voxel.
    assert abs(float(a.sum()) - float(b.sum())) < 0.1 * float(a.sum())
    ca, cb = torch.nonzero(a[0]).float().mean(0), torch.nonzero(b[0]).float().mean(0)
    assert torch.all((ca - cb).abs() < 1.5)


def _copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_prepared_crops_equal_the_nifti_path_and_refuse_stale_data(dataset_dir, tmp_path, capsys):
    import os

    from fastsam3d_distill.cli import main
    from fastsam3d_distill.prepared import PreparedCropDataset, prepare_crops

    data = _copy_dataset(dataset_dir, tmp_path / "data")
    cases = discover(data)
    samples = index_samples(cases, classes=[1, 2], min_voxels=1)
    prep = tmp_path / "prep"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(data),
                "--classes",
                "1",
                "2",
                "--min-voxels",
                "1",
                "--out",
                str(prep),
            ]
        )
        == 0
    )
    for augment in (False, True):
        ref = CropDataset(cases, samples, augment=augment, seed=7)
        got = PreparedCropDataset(
            prep, augment=augment, seed=7, expect={"lattice_anchor": "centre", "classes": [1, 2]}
        )
        assert got.cases == cases and got.samples == samples
        for i in range(len(samples)):
            a, b = ref.get(i, epoch=3), got.get(i, epoch=3)
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            assert a["image"].dtype == b["image"].dtype == torch.float32
    # without augmentation the trainer reads batches in threads straight into (pinned)
    # buffers: the same items, targets widened from uint8, buffers reused round the ring
    from fastsam3d_distill.prefetch import BatchPrefetcher

    plain = PreparedCropDataset(prep)
    assert plain.direct_read and not PreparedCropDataset(prep, augment=True).direct_read
    n = len(samples)
    order = [[k % n, (3 * k + 1) % n] for k in range(5)]  # more batches than buffers
    reader = BatchPrefetcher(plain, threads=2, depth=2, device=torch.device("cpu"))
    for idx, batch in zip(order, reader.run(order), strict=True):
        assert batch["id"].tolist() == idx and batch["label"].dtype == torch.float32
        for j, i in enumerate(idx):
            want = plain.get(i)
            assert torch.equal(batch["image"][j], want["image"])
            assert torch.equal(batch["label"][j], want["label"])
    early = reader.run(order)
    next(early)
    early.close()  # a consumer that stops early leaves no read in flight
    reader.close()
    # stage 1 trains from it (threaded reads; with --augment through DataLoader workers)
    assert (
        main(
            [
                "distill",
                "--preset",
                "tiny",
                "--prepared",
                str(prep),
                "--classes",
                "1",
                "2",
                "--min-voxels",
                "1",
                "--out",
                str(tmp_path / "ok"),
                "--max-steps",
                "1",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    # evaluate from the prepared crops: the same scores as from the NIfTI files
    from distill_helpers import STUDENT_OVERRIDES

    scores = []
    for src in (["--data", str(data)], ["--prepared", str(prep)]):
        ev = tmp_path / f"eval{len(scores)}"
        argv = ["evaluate", "--model", "fixture:fastsam3d", "--model-override", *STUDENT_OVERRIDES]
        argv += [*src, "--classes", "1", "2", "--min-voxels", "1", "--clicks", "2"]
        assert main([*argv, "--grids", "crop", "--device", "cpu", "--out", str(ev)]) == 0
        scores.append(json.loads((ev / "evaluation.json").read_text()))
    assert scores[0] == scores[1] and len(scores[0]["crop"]["samples"]) == len(samples)
    # the same settings again: reused as they are; other settings: refused
    stamp = os.stat(prep / "images.npy").st_mtime_ns
    prepare_crops(cases, samples, prep, classes=[1, 2], min_voxels=1)
    assert os.stat(prep / "images.npy").st_mtime_ns == stamp
    with pytest.raises(ValueError, match="lattice_anchor"):
        prepare_crops(cases, samples, prep, anchor="corner", classes=[1, 2], min_voxels=1)
    with pytest.raises(ValueError, match="lattice_anchor=.centre"):
        PreparedCropDataset(prep, expect={"lattice_anchor": "corner"})
    # an edited label makes the prepared crops stale, by name
    lab = cases[1].label
    st = os.stat(lab)
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=f"stale: case {cases[1].name}"):
        PreparedCropDataset(prep)
    assert (
        main(
            [
                "distill",
                "--preset",
                "tiny",
                "--prepared",
                str(prep),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "1",
            ]
        )
        == 2
    )
    assert "stale" in capsys.readouterr().err
