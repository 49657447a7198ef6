"""Dense prediction (ctxagg.dense): backbone adapter on every family, all seven detectors, Semantic FPN, COCO
metrics against hand-computed answers, COCO/VOC/PNG loaders, exact resume. Small non-square inputs throughout."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

import ctxagg  # noqa: E402,F401
from ctxagg.dense.backbone import FixedSizeBackboneError, TimmFPN, create_dense_backbone  # noqa: E402
from ctxagg.dense.config import DenseConfig  # noqa: E402
from ctxagg.dense.data import (CocoDetection, DigitsDetection, DigitsSegmentation, SegmentationFolder,  # noqa: E402
                               VocDetection)
from ctxagg.dense.detectors import build_torchvision_detector  # noqa: E402
from ctxagg.dense.metrics import DetectionMetric, SegmentationMetric  # noqa: E402
from ctxagg.dense.semantic_fpn import build_semantic_fpn  # noqa: E402

# one small configuration per family (same code paths as the full-size models, a fraction of the compute)
TINY = {
    "container_light": dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8),
    "linglo_b0": dict(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2)),
    "resnet50_lesa": dict(layers=(1, 1, 1, 1)),
    "deit_s": dict(embed_dim=32, depth=2, num_heads=2),
    "swin_t": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}
H, W = 64, 96  # non-square


def _targets(h=H, w=W):
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    masks[1, 20:60, 50:90] = 1
    return dict(boxes=torch.tensor([[10.0, 8, 50, 40], [50, 20, 90, 60]]), labels=torch.tensor([1, 2]), masks=masks)


# ---------------------------------------------------------------- backbone adapter

@pytest.mark.parametrize("name,channels", [
    ("container_light", [8, 16, 16]), ("linglo_b0", [16, 16, 32]), ("resnet50_lesa", [512, 1024, 2048]),
    ("deit_s", [32, 32, 32]), ("swin_t", [32, 64, 128])])
def test_every_family_gives_fpn_levels_at_strides_8_16_32(name, channels):
    body = create_dense_backbone(name, num_levels=3, **TINY[name])
    assert body.strides == (8, 16, 32)
    assert body.channels == channels
    fpn = TimmFPN(body, out_channels=24)
    out = fpn(torch.randn(2, 3, H, W))
    assert [tuple(v.shape) for v in out.values()] == [(2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]
    sum(v.square().mean() for v in out.values()).backward()
    grads = [p.grad for p in body.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_lesa_classification_is_output_stride_16_and_dense_form_is_32():
    import timm
    cls = timm.create_model("resnet50_lesa", **TINY["resnet50_lesa"])
    assert cls.forward_features(torch.randn(1, 3, H, W)).shape[-2:] == (4, 6)  # 64/16, 96/16: lesa.txt §4.1
    body = create_dense_backbone("resnet50_lesa", num_levels=4, **TINY["resnet50_lesa"])
    assert body.strides == (4, 8, 16, 32)
    assert [m.shape[-2:] for m in body(torch.randn(1, 3, H, W))][-1] == (2, 3)


def test_vit_and_swin_take_sizes_other_than_their_training_size():
    for name in ("deit_s", "swin_t"):
        body = create_dense_backbone(name, num_levels=4, **TINY[name])
        for h, w in ((64, 96), (96, 64), (128, 160)):
            maps = body(torch.randn(1, 3, h, w))
            assert [tuple(m.shape[-2:]) for m in maps] == [(h // s, w // s) for s in (4, 8, 16, 32)], name


def test_fixed_size_mixer_is_refused_naming_its_size():
    with pytest.raises(FixedSizeBackboneError, match="mlp has fixed-size mixers built for 224×224"):
        create_dense_backbone("mlp")


def test_frozen_stages_and_frozen_bn():
    from torchvision.ops.misc import FrozenBatchNorm2d
    body = create_dense_backbone("resnet50_lesa", frozen_stages=1, frozen_bn=True, **TINY["resnet50_lesa"])
    trainable = {n.split(".")[0] for n, p in body.model.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in body.model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trainable == {"layer2", "layer3", "layer4"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 1 + 4 * 3 + 4  # stem, blocks, shortcuts
    body = create_dense_backbone("container_light", frozen_stages=2, **TINY["container_light"])
    frozen = {".".join(n.split(".")[:2]) for n, p in body.model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem.proj", "stem.norm", "stages.0", "stages.1"} - ({"stem.norm"} - {
        ".".join(n.split(".")[:2]) for n, _ in body.model.named_parameters()})
    assert all(p.requires_grad for n, p in body.model.named_parameters() if n.startswith(("stages.2", "stages.3")))


def test_backbone_checkpoint_from_a_train_run_initialises_the_backbone(tmp_path):
    import timm
    from ctxagg.train.checkpoint import save_checkpoint
    from ctxagg.train.config import input_size_overrides
    kwargs = {**input_size_overrides("linglo_b0", 32), **TINY["linglo_b0"]}
    trained = timm.create_model("linglo_b0", num_classes=10, **kwargs)
    with torch.no_grad():
        for p in trained.parameters():
            p.uniform_(-1, 1)
    save_checkpoint(tmp_path / "model_best.safetensors", {f"model.{k}": v for k, v in trained.state_dict().items()},
                    dict(config=dict(model="linglo_b0", img_size=32, model_kwargs=TINY["linglo_b0"]), num_classes=10))
    body = create_dense_backbone("linglo_b0", checkpoint=str(tmp_path))
    own = body.model.state_dict()
    assert set(own) <= set(trained.state_dict())
    assert all(torch.equal(own[k], trained.state_dict()[k]) for k in own)
    with pytest.raises(Exception, match="holds a 'linglo_b0' model, not 'container_light'"):
        create_dense_backbone("container_light", checkpoint=str(tmp_path))


# ---------------------------------------------------------------- detectors: one train step + evaluation

SMALL_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, box_detections_per_img=20)
SMALL_DETR = dict(d_model=32, encoder_layers=1, decoder_layers=2, num_queries=8, encoder_ffn_dim=32,
                  decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2)


def _build(arch, backbone):
    if "detr" in arch:
        from ctxagg.dense.detr import build_detr_detector
        return build_detr_detector(arch, backbone, 2, min_size=H, max_size=W, model_kwargs=TINY[backbone],
                                   **SMALL_DETR)
    extra = SMALL_RCNN if "rcnn" in arch else dict(detections_per_img=20, topk_candidates=50)
    return build_torchvision_detector(arch, backbone, 2, min_size=H, max_size=W, model_kwargs=TINY[backbone],
                                      fpn_channels=32, detector_kwargs=extra)


@pytest.mark.parametrize("arch,backbone", [
    ("retinanet", "container_light"), ("fcos", "linglo_b0"), ("faster_rcnn", "resnet50_lesa"),
    ("mask_rcnn", "linglo_b0"), ("detr", "deit_s"), ("conditional_detr", "swin_t"),
    ("deformable_detr", "container_light")])
def test_every_detector_trains_a_step_and_evaluates(arch, backbone):
    torch.manual_seed(0)
    model = _build(arch, backbone)
    images = [torch.rand(3, H, W), torch.rand(3, H + 8, W - 16)]
    targets = [_targets(), _targets(H + 8, W - 16)]
    targets[1]["boxes"][1, 2] = W - 17  # inside the narrower image
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loss.backward()
    opt.step()
    backbone_params = [n for n in before if ".body.model." in n or "conv_encoder.model." in n or
                       "backbone.model.model." in n]
    assert backbone_params and any(not torch.equal(before[n], dict(model.named_parameters())[n])
                                   for n in backbone_params)
    model.eval()
    with torch.no_grad():
        preds = model(images)
    for pred, image in zip(preds, images):
        assert pred["boxes"].shape[1] == 4 and len(pred["boxes"]) == len(pred["scores"]) == len(pred["labels"])
        if len(pred["labels"]):
            assert pred["labels"].min() >= 1 and pred["labels"].max() <= 2
            assert (pred["boxes"][:, 2] <= image.shape[-1] + 1e-3).all()
    metric = DetectionMetric(masks=arch == "mask_rcnn")
    metric.update(preds, targets)
    result = metric.compute()
    assert 0.0 <= result["bbox_map"] <= 1.0 and (arch != "mask_rcnn" or 0.0 <= result["segm_map"] <= 1.0)


def test_detr_batchnorm_is_frozen_only_for_a_checkpointed_backbone():
    from ctxagg.dense.detr import build_detr_detector
    model = build_detr_detector("detr", "resnet50_lesa", 2, min_size=H, max_size=W,
                                model_kwargs=TINY["resnet50_lesa"], **SMALL_DETR)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight.requires_grad for m in bns)  # from scratch: trainable BN, not an identity
    frozen = build_detr_detector("detr", "resnet50_lesa", 2, min_size=H, max_size=W, frozen_bn=True,
                                 model_kwargs=TINY["resnet50_lesa"], **SMALL_DETR)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.model.model.backbone.modules())


# ---------------------------------------------------------------- metrics: known answers

def test_coco_map_of_a_hand_made_prediction_set():
    # one image, two ground-truth boxes of class 1. Predictions by score: exact hit on A (IoU 1), a miss, and
    # a hit on B with IoU 62/100. At IoU 0.50/0.55/0.60: TP FP TP → 101-point AP = (51·1 + 50·2/3)/101;
    # at the seven thresholds 0.65…0.95: TP FP FP → AP = 51/101. All objects are "small" (< 32²).
    gt = dict(boxes=torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10]]), labels=torch.tensor([1, 1]))
    pred = dict(boxes=torch.tensor([[20.0, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 6.2]]),
                scores=torch.tensor([0.9, 0.8, 0.7]), labels=torch.tensor([1, 1, 1]))
    metric = DetectionMetric()
    metric.update([pred], [gt])
    out = metric.compute()
    ap_low, ap_high = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert out["bbox_map_50"] == pytest.approx(ap_low, abs=1e-4)
    assert out["bbox_map_75"] == pytest.approx(ap_high, abs=1e-4)
    assert out["bbox_map"] == pytest.approx((3 * ap_low + 7 * ap_high) / 10, abs=1e-4)
    assert out["bbox_map_small"] == pytest.approx(out["bbox_map"], abs=1e-6)
    assert out["bbox_map_medium"] == -1.0 and out["bbox_map_large"] == -1.0


def test_mask_map_and_miou_known_answers():
    masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True
    pred_mask = masks.clone()
    pred_mask[0, 6:10] = False  # IoU 60/100: a hit up to threshold 0.60, a miss above
    metric = DetectionMetric(masks=True)
    metric.update([dict(boxes=torch.tensor([[0.0, 0, 10, 10]]), scores=torch.tensor([0.9]), labels=torch.tensor([1]),
                        masks=pred_mask[:, None].float())],
                  [dict(boxes=torch.tensor([[0.0, 0, 10, 10]]), labels=torch.tensor([1]), masks=masks)])
    out = metric.compute()
    assert out["bbox_map"] == pytest.approx(1.0) and out["segm_map_50"] == pytest.approx(1.0)
    assert out["segm_map_75"] == pytest.approx(0.0) and out["segm_map"] == pytest.approx(0.2, abs=1e-4)
    seg = SegmentationMetric(num_classes=4, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 255, 2]])
    preds = torch.tensor([[0, 1, 1, 1, 3, 2]])  # the ignored pixel's wrong class must not count
    seg.update(preds, target)
    res = seg.compute()
    # IoU: class 0 = 1/2, class 1 = 2/3, class 2 = 1, class 3 absent everywhere once the ignored pixel goes
    assert res["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3, abs=1e-3)
    assert res["pixel_acc"] == pytest.approx(100 * 4 / 5, abs=1e-3)


# ---------------------------------------------------------------- data loaders

def _write_png(path: Path, array: np.ndarray) -> None:
    from torchvision.io import write_png
    path.parent.mkdir(parents=True, exist_ok=True)
    t = torch.from_numpy(array)
    write_png(t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous(), str(path))


def test_coco_json_round_trip_with_masks_and_a_degenerate_box(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (30, 40)), ("b.png", (24, 50))):
        _write_png(tmp_path / "images" / name, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    coco = dict(images=[dict(id=7, file_name="a.png", height=30, width=40),
                        dict(id=9, file_name="b.png", height=24, width=50)],
                categories=[dict(id=5, name="cat"), dict(id=2, name="ant")],
                annotations=[dict(id=1, image_id=7, category_id=5, bbox=[4, 6, 10, 8], area=80, iscrowd=0,
                                  segmentation=[[4, 6, 14, 6, 14, 14, 4, 14]]),
                             dict(id=2, image_id=7, category_id=2, bbox=[20, 5, 0, 9], area=0, iscrowd=0,
                                  segmentation=[[20, 5, 20, 5, 20, 14]]),
                             dict(id=3, image_id=9, category_id=2, bbox=[1, 2, 30, 20], area=600, iscrowd=0,
                                  segmentation=[[1, 2, 31, 2, 31, 22, 1, 22]])])
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="ctxagg.dense"):
        ds = CocoDetection(tmp_path / "ann.json")
    assert ds.dropped == 1 and "1 degenerate box" in caplog.text
    assert ds.classes == ["ant", "cat"] and len(ds) == 2  # category ids 2, 5 → labels 1, 2
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[4.0, 6.0, 14.0, 14.0]] and target["labels"].tolist() == [2]
    assert target["masks"].shape == (1, 30, 40) and target["image_id"].item() == 7
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 13, 6, 13)
    _, target = ds[1]
    assert target["boxes"].tolist() == [[1.0, 2.0, 31.0, 22.0]] and target["labels"].tolist() == [1]


def _voc_xml(name: str, objects) -> str:
    objs = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in objects)
    return f"<annotation><filename>{name}</filename><size><width>40</width><height>30</height></size>{objs}</annotation>"


def test_voc_folder_round_trip_drops_degenerate_boxes_with_a_message(tmp_path, caplog):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("i1", "i2"):
        _write_png(root / "JPEGImages" / f"{stem}.png", np.full((30, 40, 3), 128, np.uint8))
    (root / "Annotations" / "i1.xml").write_text(_voc_xml("i1.png", [("WBC", (1, 2, 11, 12)),
                                                                     ("RBC", (5, 5, 5, 9))]))
    (root / "Annotations" / "i2.xml").write_text(_voc_xml("i2.png", [("RBC", (3, 4, 30, 25))]))
    (root / "ImageSets" / "Main" / "train.txt").write_text("i1\ni2\n")
    with caplog.at_level(logging.WARNING, logger="ctxagg.dense"):
        ds = VocDetection(root, "train")
    assert ds.dropped == 1 and "dropped 1 degenerate box" in caplog.text and "i1.xml" in caplog.text
    assert ds.classes == ["RBC", "WBC"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["boxes"].tolist() == [[1.0, 2.0, 11.0, 12.0]]
    assert target["labels"].tolist() == [2]
    assert ds[1][1]["labels"].tolist() == [1]
    with pytest.raises(Exception, match="ImageSets/Main/val.txt"):
        VocDetection(root, "val")


def test_png_segmentation_folders_pair_and_ade20k_layouts(tmp_path):
    label = np.array([[0, 1, 2, 11], [3, 250, 4, 10]], dtype=np.uint8)
    _write_png(tmp_path / "cam" / "train" / "x.png", np.zeros((2, 4, 3), np.uint8))
    _write_png(tmp_path / "cam" / "trainannot" / "x.png", label)
    image, target = SegmentationFolder(tmp_path / "cam", "train", num_classes=11)[0]
    assert image.shape == (3, 2, 4)
    assert target.tolist() == [[0, 1, 2, 255], [3, 255, 4, 10]]  # 11 (void) and 250 → ignore
    _write_png(tmp_path / "ade" / "images" / "validation" / "y.png", np.zeros((2, 4, 3), np.uint8))
    _write_png(tmp_path / "ade" / "annotations" / "validation" / "y.png", label)
    _, target = SegmentationFolder(tmp_path / "ade", "val", layout="ade20k", num_classes=150)[0]
    assert target.tolist() == [[255, 0, 1, 10], [2, 255, 3, 9]]  # 0 "other" ignored, k → k - 1, 250 > 150
    with pytest.raises(Exception, match="no label map"):
        (tmp_path / "cam" / "train" / "z.png").write_bytes((tmp_path / "cam" / "train" / "x.png").read_bytes())
        SegmentationFolder(tmp_path / "cam", "train")


def test_embedded_digits_boxes_are_tight_around_stroke_masks():
    ds = DigitsDetection(6, size=(80, 112), seed=1)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 80, 112)
        assert 1 <= len(target["labels"]) <= 4 and target["labels"].min() >= 1 and target["labels"].max() <= 10
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert image[0][mask.bool()].min() > 0.25  # masks cover strokes only
    again = DigitsDetection(6, size=(80, 112), seed=1)[2][1]
    assert torch.equal(again["boxes"], ds[2][1]["boxes"])
    seg_img, seg = DigitsSegmentation(2, size=(80, 112), seed=1)[0]
    det = DigitsDetection(2, size=(80, 112), seed=1)[0][1]
    expected = torch.zeros(80, 112, dtype=torch.int64)
    for label, mask in zip(det["labels"], det["masks"]):
        expected[mask.bool()] = label
    assert torch.equal(seg, expected)


# ---------------------------------------------------------------- Semantic FPN, training loop, resume

def test_semantic_fpn_output_and_gradient():
    net = build_semantic_fpn("container_light", 5, fpn_channels=16, channels=8, model_kwargs=TINY["container_light"])
    assert [len(b) for b in net.branches] == [3, 4, 8, 12]  # 1, 1, 2, 3 conv-GN-ReLU(-up) stages (Kirillov Fig. 3)
    x = torch.randn(2, 3, H, W, requires_grad=True)
    logits = net(x)
    assert logits.shape == (2, 5, H, W)
    logits[:, 1].mean().backward()
    assert x.grad.abs().sum() > 0


def _dense_cfg(**kw):
    base = dict(task="detect", arch="retinanet", backbone="linglo_b0", epochs=2, batch_size=2, digits_count=4,
                min_size=64, max_size=96, lr=1e-3, seed=5, model_kwargs=TINY["linglo_b0"],
                detector_kwargs=dict(detections_per_img=10, topk_candidates=20))
    base.update(kw)
    return DenseConfig(**base)


def test_detection_resume_equals_uninterrupted(tmp_path):
    from ctxagg.dense.engine import evaluate_dense, train_dense
    from ctxagg.train.checkpoint import load_checkpoint
    full = train_dense(_dense_cfg(), output=str(tmp_path / "full"), progress=False)
    # interrupted after epoch 1 of the same 2-epoch schedule (max_steps), then continued
    half = train_dense(_dense_cfg(max_steps=full.history[0]["steps"]), output=str(tmp_path / "half"), progress=False)
    assert len(half.history) == 1
    resumed = train_dense(_dense_cfg(), output=str(tmp_path / "half"), resume=str(tmp_path / "half"), progress=False)
    a, _ = load_checkpoint(tmp_path / "full" / "last.safetensors")
    b, meta = load_checkpoint(tmp_path / "half" / "last.safetensors")
    assert meta["epoch"] == 1 and meta["steps"] == 4
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    for name in ("metrics.csv", "curves.png", "predictions.png", "model_best.safetensors"):
        assert (tmp_path / "full" / name).is_file()
    with pytest.raises(Exception, match="already holds"):
        train_dense(_dense_cfg(), output=str(tmp_path / "full"), progress=False)
    with pytest.raises(Exception, match="already holds"):  # resuming into another run's folder is refused too
        train_dense(_dense_cfg(), output=str(tmp_path / "full"), resume=str(tmp_path / "half"), progress=False)
    result = evaluate_dense(str(tmp_path / "full"), progress=False)
    assert 0.0 <= result["bbox_map"] <= 1.0 and Path(result["output"], "predictions.png").is_file()


def test_segmentation_run_learns_the_background(tmp_path):
    from ctxagg.dense.engine import train_dense
    cfg = _dense_cfg(task="segment", arch="semantic_fpn", epochs=2, digits_count=8, lr=3e-3, detector_kwargs={})
    result = train_dense(cfg, output=str(tmp_path / "seg"), progress=False)
    first, last = result.history
    assert last["train_loss"] < first["train_loss"]
    assert last["per_class_iou"][0] > 80  # background pixels (most of the canvas) are learnt first
    assert (tmp_path / "seg" / "predictions.png").is_file()


def test_cli_detect_train_eval_and_refusals(tmp_path, monkeypatch, capsys):
    from ctxagg.cli import main
    monkeypatch.chdir(tmp_path)
    common = ["--backbone", "linglo_b0", "--model-kwargs", json.dumps(TINY["linglo_b0"]), "--epochs", "1",
              "--digits-count", "4", "--batch-size", "2", "--min-size", "64", "--max-size", "96", "--no-progress",
              "--detector-kwargs", json.dumps(dict(detections_per_img=10, topk_candidates=20))]
    assert main(["detect", "train", *common]) == 0
    run = Path("runs/latest").resolve()
    assert run.name.startswith("detect-retinanet-linglo_b0-digits-") and (run / "model_best.safetensors").is_file()
    assert main(["detect", "train", *common, "--output", str(run)]) == 2  # an explicit folder holding a run
    assert "already holds" in capsys.readouterr().err
    assert main(["detect", "eval", str(run), "--no-progress"]) == 0
    assert (run / "eval-val" / "eval.json").is_file()
    assert main(["detect", "eval", str(run), "--no-progress"]) == 0  # a second default eval: a new folder
    assert (run / "eval-val-1" / "eval.json").is_file()
    assert main(["detect", "train", *common, "--arch", "semantic_fpn"]) == 2
    assert "not a detect model" in capsys.readouterr().err
    assert main(["segment", "train", "--backbone", "no_such_net"]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def test_each_process_takes_its_share_of_every_global_batch():
    from ctxagg.dense.engine import _epoch_loader

    class Items(torch.utils.data.Dataset):  # 11 images, global batch 4: 2 steps, 3 images left over
        def __len__(self):
            return 11

        def __getitem__(self, i):
            return torch.tensor(i), {}

    cfg = _dense_cfg(batch_size=4, seed=3)

    def batches(rank=0, world=1):
        return [[int(i) for i in images] for images, _ in _epoch_loader(Items(), cfg, 1, rank, world)]

    single, shares = batches(), [batches(rank, 2) for rank in (0, 1)]
    assert len(single) == 2 and [len(s) for s in shares] == [2, 2]  # the same number of steps on every process
    for step in range(2):  # each global batch is split in two halves of 2, the same images
        assert len(shares[0][step]) == len(shares[1][step]) == 2
        assert sorted(shares[0][step] + shares[1][step]) == sorted(single[step])
    assert len(set(single[0] + single[1])) == 8


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_detection_run(tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / "run_dense.py"
    script.write_text("import sys, json\nfrom ctxagg.dense.config import DenseConfig\nfrom ctxagg.dense.engine import "
                      "train_dense\ntrain_dense(DenseConfig(**json.loads(sys.argv[1])), output=sys.argv[2], "
                      "progress=False)\n")
    cfg = dict(_dense_cfg(batch_size=4, digits_count=8).to_json())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(cfg), str(tmp_path / "ddp")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from ctxagg.train.checkpoint import load_checkpoint
    _, meta = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    assert [h["epoch"] for h in meta["history"]] == [0, 1] and meta["steps"] == 4  # 8 images, global batch 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "run_dense.py"]


def test_bench_dense_measures_each_backbone_at_non_square_sizes(tmp_path, capsys):
    from ctxagg.cli import main
    from ctxagg.dense.bench import dense_backbone_sweep
    rows = dense_backbone_sweep(["linglo_b0"], sizes=[(64, 90), (32, 32)], repeats=1, warmup=0)
    assert [r["size"] for r in rows] == [32, "64x96"]  # by area, padded to 32 as detectors batch; squares: a side
    small, large = rows
    assert all(r["status"] == "measured" and r["latency_ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert large["gmacs"] == pytest.approx(small["gmacs"] * 6, rel=0.15)  # linear attention: cost ∝ pixels
    rows = dense_backbone_sweep(["linglo_b0"], sizes=[(32, 32), (256, 256)], repeats=1, warmup=0, max_seconds=1e-6)
    assert rows[1]["status"].startswith("skipped: predicted") and rows[1]["gmacs"] > rows[0]["gmacs"]
    assert main(["bench", "dense", "--models", "linglo_b0", "--sizes", "32x48", "--repeats", "1", "--warmup", "0",
                 "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "bench_dense.json").read_text())["rows"][0]["size"] == "32x64"
    assert main(["bench", "dense", "--sizes", "32by48", "--output", str(tmp_path / "c")]) == 2
    assert "is not HxW" in capsys.readouterr().err
