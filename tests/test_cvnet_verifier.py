"""cvnet_verifier: fast scoring == a straightforward CVNet (tests/_cvnet_reference.py), training
pairs, stored entries, the pre-activation backbone tap, the official-checkpoint import, real photos,
explain() and the border option."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import pytest

from _cvnet_reference import (
    DEPTHS,
    correlation_of_levels,
    global_descriptor,
    head_state_as_official,
    learner_logits,
    pycls_resnet,
    reference_logits,
)
from heads._cvnet.official import CheckpointImportError, convert_official_state, import_cvnet_checkpoint
from heads.cvnet_verifier import CVNetVerifierHead, check_pair_size
from retrieval_lightning.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from retrieval_lightning.head import EntryKind


def make_head(channels: int = 24, width: int = 16, **kwargs: object) -> CVNetVerifierHead:
    """A built head whose GroupNorms are not at their identity init (so they are tested too)."""
    torch.manual_seed(0)
    head = CVNetVerifierHead(width=width, **kwargs)
    head.build({"conv4": channels}, 0)
    for module in head.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    return head.eval()


def entry_from_conv4(head: CVNetVerifierHead, conv4: torch.Tensor) -> dict[str, torch.Tensor]:
    return head.extract_entries([torch.zeros(3, 1, 1)], lambda _: {"conv4": conv4})[0]


def test_fast_path_matches_the_straightforward_cvnet_on_synthetic_maps() -> None:
    head = make_head(entry_dtype="float32")
    state = head_state_as_official(head.state_dict())
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(1, 24, 7, 9, generator=gen)
    dbs = [torch.randn(1, 24, 7, 9, generator=gen) for _ in range(3)] + [torch.randn(1, 24, 5, 6, generator=gen)]
    dbs.append(query + 0.1 * torch.randn(1, 24, 7, 9, generator=gen))
    with torch.no_grad():
        ref = torch.cat([reference_logits(state, query, db) for db in dbs])
        fast = torch.cat([head.pair_logits(head.project(query), head.project(db)) for db in dbs])
        scores = head.score(entry_from_conv4(head, query), [entry_from_conv4(head, db) for db in dbs], [0] * 5)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, ref.softmax(-1)[:, 1], atol=1e-4, rtol=0)
    assert ref[:, 1].std() > 1e-3  # the pairs really differ: the check is not vacuous


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_scoring_group_norm_equals_torch_group_norm_even_far_from_zero(offset: float) -> None:
    """The in-place GroupNorm of scoring (no autograd) against nn.GroupNorm in float64, also on
    groups whose mean is ``offset`` times their spread (sums of squares alone cancel there)."""
    from heads._cvnet.network import group_norm_relu

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(2, 5, 4, 3, 6, 16) + torch.randn(16) + offset  # channels last; each channel its own mean
    reference = F.relu(F.group_norm(x.double().movedim(-1, 1), 4, norm.weight.double(), norm.bias.double(),
                                    norm.eps)).movedim(1, -1)
    with torch.no_grad():
        fast = group_norm_relu(x.clone(), norm)
        torch_fp32 = F.relu(norm(x.movedim(-1, 1))).movedim(1, -1)  # what fp32 inputs this far from 0 allow
    trained = group_norm_relu(x.clone().requires_grad_(), norm)
    tolerance = 3 * (torch_fp32.double() - reference).abs().max() + 1e-6
    assert (fast.double() - reference).abs().max() < tolerance
    assert (trained.detach().double() - reference).abs().max() < tolerance


def test_identity_projection_correlates_the_stage_itself_and_trains_only_the_4d_network() -> None:
    """``projection: identity`` scores as the straightforward CVNet whose three projections are identity
    kernels (3x3, centre tap 1): the levels are the resized stage map and their width its channel count;
    it has no projection parameters, and its loss reaches every one of the 4D network's."""
    head = make_head(projection="identity", entry_dtype="float32")
    assert head.width == 24 and head.entry_kinds()["level0"].shape == (24,)
    assert not any(name.startswith("projections") for name, _ in head.named_parameters())
    identity_kernel = torch.zeros(24, 24, 3, 3)
    identity_kernel[range(24), range(24), 1, 1] = 1
    state = head_state_as_official({**head.state_dict(), **{f"projections.{i}.weight": identity_kernel
                                                            for i in range(3)}})
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 24, 7, 9, generator=gen)
    dbs = [torch.randn(1, 24, 7, 9, generator=gen), query + 0.2 * torch.randn(1, 24, 7, 9, generator=gen)]
    with torch.no_grad():
        ref = torch.cat([reference_logits(state, query, db) for db in dbs])
        scores = head.score(entry_from_conv4(head, query), [entry_from_conv4(head, db) for db in dbs], [0, 0])
    torch.testing.assert_close(scores, ref.softmax(-1)[:, 1], atol=1e-4, rtol=0)
    head.train()
    features = {"conv4": torch.randn(4, 24, 6, 6, generator=gen)}
    head.losses(features, torch.tensor([0, 0, 1, 1]))["pair_ce"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="projection must be one of"):
        CVNetVerifierHead(projection="pca")


def test_aligned_pair_batch_and_zeroed_database_locations() -> None:
    head = make_head()
    state = head_state_as_official(head.state_dict())
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 24, 6, 8, generator=gen), torch.randn(3, 24, 6, 8, generator=gen)
    with torch.no_grad():
        q_levels, k_levels = head.project(q), head.project(k)
        k_levels[2][:, :, 1:3, 2:5] = 0  # a sparsifier dropped these locations of level 2
        k_levels[0][1, :, 0, 0] = 0
        fast = head.pair_logits(q_levels, k_levels)
        ref = learner_logits(state, correlation_of_levels(q_levels, k_levels))
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


def test_score_dtype_chooses_the_scoring_arithmetic() -> None:
    """``float32`` is the official tester's arithmetic on every device; ``bfloat16`` autocasts (the
    GPU default) and moves the scores a little; ``auto`` is fp32 on this CPU."""
    head = make_head(entry_dtype="float32")
    gen = torch.Generator().manual_seed(3)
    query = entry_from_conv4(head, torch.randn(1, 24, 7, 9, generator=gen))
    dbs = [entry_from_conv4(head, torch.randn(1, 24, 7, 9, generator=gen)) for _ in range(3)]
    auto = head.score(query, dbs, [0] * 3)
    head.score_dtype = "float32"
    assert torch.equal(head.score(query, dbs, [0] * 3), auto)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's bf16 region does not change fp32 scoring
        assert torch.equal(head.score(query, dbs, [0] * 3), auto)
    head.score_dtype = "bfloat16"
    bf16 = head.score(query, dbs, [0] * 3)
    assert not torch.equal(bf16, auto)
    torch.testing.assert_close(bf16, auto, atol=3e-2, rtol=0)
    half = make_head()  # the default fp16 entries: CPU autocast could not stack them in a caller's bf16 region
    query16 = entry_from_conv4(half, torch.randn(1, 24, 7, 9, generator=gen))
    dbs16 = [entry_from_conv4(half, torch.randn(1, 24, 7, 9, generator=gen)) for _ in range(2)]
    outside = half.score(query16, dbs16, [0] * 2)
    for dtype in ("float32", "bfloat16"):
        half.score_dtype = dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = half.score(query16, dbs16, [0] * 2)
        assert torch.equal(inside, outside) if dtype == "float32" else inside.isfinite().all()
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        CVNetVerifierHead(score_dtype="fp8")
    with pytest.raises(ValueError, match="entry_dtype must be float16 or float32"):  # no store holds bfloat16
        CVNetVerifierHead(entry_dtype="bfloat16")


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": -1}, "batch_size must be >= 1"),  # scored nothing: uninitialised scores were returned
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"max_pairs": 1}, "max_pairs must be >= 2"),  # 0, 1 and -5 all trained on 2 pairs
    ({"projection": "learned", "width": -4}, "width must be >= 1"),
])
def test_options_that_would_score_or_train_otherwise_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CVNetVerifierHead(**options)


def test_a_batch_of_one_image_is_named_as_forming_no_pair() -> None:
    head = CVNetVerifierHead(stage="conv4", projection="learned", width=4)
    head.build({"conv4": 8}, 0)
    with pytest.raises(ValueError, match="a batch of 1 image\\(s\\) forms no pair"):
        head._in_batch_pairs(torch.tensor([3]))


def test_a_pair_too_large_for_the_4d_network_is_refused_before_anything_is_allocated() -> None:
    """Phone photos at full size (4032 x 3024 px: 252 x 189 cells) would need tens of GB; 2048 px passes."""
    from retrieval_lightning.errors import UsageError

    head = make_head(entry_dtype="float32")
    query = entry_from_conv4(head, torch.randn(1, 24, 7, 9))
    phone, large = dict(query), dict(query)  # only the recorded sizes change: the rows are never read
    phone["level2_hw"] = torch.tensor([189, 252], dtype=torch.int32)
    large["level2_hw"] = torch.tensor([96, 128], dtype=torch.int32)
    with pytest.raises(UsageError, match=r"a 189x252-cell query against a 96x128-cell candidate .*--max-side 1024"):
        head.score(phone, [query, large], [0, 0])
    check_pair_size((96, 128), (96, 128))  # 2048 x 1536 px images: allowed
    with pytest.raises(UsageError, match=r"first block alone would hold 8 GB"):
        check_pair_size((189, 252), (189, 252))


def test_a_thumbnail_of_one_cell_on_a_side_is_scored_as_the_straightforward_cvnet_scores_it() -> None:
    """An image of at most 16 px on a side (one conv4 cell) must not stop a database's extraction: the
    official pyramid would ask for a zero-sized level there."""
    head = make_head(entry_dtype="float32")
    state = head_state_as_official(head.state_dict())
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 24, 7, 9, generator=gen)
    thumbs = [torch.randn(1, 24, *hw, generator=gen) for hw in ((1, 5), (1, 1), (2, 1))]
    with torch.no_grad():
        ref = torch.cat([reference_logits(state, query, t) for t in thumbs] +
                        [reference_logits(state, t, query) for t in thumbs])
        scores = torch.cat([head.score(entry_from_conv4(head, query), [entry_from_conv4(head, t) for t in thumbs],
                                       [0] * 3),
                            torch.cat([head.score(entry_from_conv4(head, t), [entry_from_conv4(head, query)], [0])
                                       for t in thumbs])])
    torch.testing.assert_close(scores, ref.softmax(-1)[:, 1], atol=1e-4, rtol=0)


def test_entries_follow_their_kinds_and_fp16_scores_stay_close() -> None:
    head = make_head(channels=256)
    backbone = Backbone("resnet18", stages=("conv4",), pre_activation=("conv4",)).eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112)]
    entries = head.extract_entries(images, backbone)
    kinds = head.entry_kinds()
    assert kinds["level0"] == EntryKind("float16", (16,), ragged=True) and kinds["level2_hw"] == EntryKind("int32", (2,))
    for entry in entries:
        assert set(entry) == set(kinds)
        for name, kind in kinds.items():
            assert str(entry[name].dtype) == f"torch.{kind.dtype}"
            assert tuple(entry[name].shape[1:] if kind.ragged else entry[name].shape) == kind.shape
        norms = entry["level1"].float().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)
    assert entries[0]["level2_hw"].tolist() == [6, 8] and entries[0]["level0_hw"].tolist() == [3, 4]
    assert entries[0]["level1_hw"].tolist() == [4, 6] and entries[1]["level2_hw"].tolist() == [5, 7]
    exact = CVNetVerifierHead(width=16, entry_dtype="float32")
    exact.build({"conv4": 256}, 0)
    exact.load_state_dict(head.state_dict())
    exact.eval()
    half = head.score(entries[0], entries, [0, 1])
    full = exact.score(*(lambda e: (e[0], e))(exact.extract_entries(images, backbone)), [0, 1])
    torch.testing.assert_close(half, full, atol=5e-3, rtol=0)


def test_in_batch_pairs_are_balanced_and_the_loss_trains_every_parameter() -> None:
    head = make_head(max_pairs=8).train()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    first, second, target = head._in_batch_pairs(labels)
    assert int(target.sum()) == 3 and len(target) == 6  # all 3 positives, as many negatives
    assert torch.equal(target, (labels[first] == labels[second]).long()) and bool((first < second).all())
    feats = torch.randn(6, 24, 6, 6, requires_grad=True)
    loss = head.losses({"conv4": feats}, labels)["pair_ce"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())
    assert [n for n, p in head.named_parameters() if not p.grad.abs().sum() > 0] == []
    explicit = torch.tensor([[0, 1, 1], [0, 2, 0]])
    with torch.no_grad():
        levels = head.project(feats)
        logits = head.pair_logits([lv[[0, 0]] for lv in levels], [lv[[1, 2]] for lv in levels])
        expected = F.cross_entropy(logits, torch.tensor([1, 0]))
        torch.testing.assert_close(head.losses({"conv4": feats}, labels, pairs=explicit)["pair_ce"], expected)


def test_backbone_pre_activation_tap() -> None:
    tapped = Backbone("resnet18", stages=("conv4", "conv5"), pre_activation=("conv4",)).eval()
    for module in tapped.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # timm zero-inits the last BN of each block
            torch.nn.init.uniform_(module.weight, 0.2, 1.0)
    plain = Backbone("resnet18", stages=("conv4", "conv5")).eval()
    plain.load_state_dict(tapped.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pre, post = tapped(x), plain(x)
    assert (pre["conv4"] < 0).any()
    torch.testing.assert_close(pre["conv4"].relu(), post["conv4"])
    torch.testing.assert_close(pre["conv5"], post["conv5"])
    with pytest.raises(ValueError, match="only defined for timm ResNets"):
        Backbone("efficientnet_lite0", pre_activation=("conv4",))


# ---- official checkpoints ----------------------------------------------------------------------
def official_shapes(depth: int, width: int = 256) -> dict[str, tuple[int, ...]]:
    """Key -> shape of sungonce/CVNet's CVNet_Rerank state dict (pycls ResNet, conv2ds, CVLearner)."""
    shapes: dict[str, tuple[int, ...]] = {"encoder_q.stem.conv.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("encoder_q.stem.bn", 64)
    w_in = 64
    for stage, (blocks, w_out, w_b) in enumerate(zip(DEPTHS[depth], (256, 512, 1024, 2048), (64, 128, 256, 512)), 1):
        for b in range(1, blocks + 1):
            p = f"encoder_q.s{stage}.b{b}"
            if b == 1:
                shapes[f"{p}.proj.weight"] = (w_out, w_in, 1, 1)
                bn(f"{p}.bn", w_out)
            shapes[f"{p}.f.a.weight"] = (w_b, w_in if b == 1 else w_out, 1, 1)
            bn(f"{p}.f.a_bn", w_b)
            shapes[f"{p}.f.b.weight"] = (w_b, w_b, 3, 3)
            bn(f"{p}.f.b_bn", w_b)
            shapes[f"{p}.f.c.weight"] = (w_out, w_b, 1, 1)
            bn(f"{p}.f.c_bn", w_out)
        w_in = w_out
    shapes.update({"encoder_q.head.pool.p": (1,), "encoder_q.head.fc.weight": (2048, 2048), "encoder_q.head.fc.bias": (2048,)})
    for i in range(3):
        shapes[f"conv2ds.{i}.weight"] = (width, 1024, 3, 3)
    cin = 9
    specs = {1: [(16, 5)], 2: [(16, 3), (32, 3)], 3: [(32, 3), (32, 3), (64, 3)], 4: [(64, 3), (64, 3), (128, 3)]}
    for block, layers in specs.items():
        for n, (out, k) in enumerate(layers):
            p = f"cv_learner.block{block}.{3 * n}"
            for conv in ("conv1", "conv2"):
                shapes[f"{p}.{conv}.weight"] = (out, cin, k, k)
                shapes[f"{p}.{conv}.bias"] = (out,)
            shapes[f"cv_learner.block{block}.{3 * n + 1}.weight"] = (out,)
            shapes[f"cv_learner.block{block}.{3 * n + 1}.bias"] = (out,)
            cin = out
    shapes.update({"cv_learner.mlp.0.weight": (128, 128), "cv_learner.mlp.0.bias": (128,),
                   "cv_learner.mlp.2.weight": (2, 128), "cv_learner.mlp.2.bias": (2,)})
    return shapes


def random_official_state(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, scaled so a deep random ResNet stays finite."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(depth).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or (key.endswith(".bias") and "bn" in key):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif "bn" in key and key.endswith("weight"):
            scale = 0.2 if ".c_bn" in key else 1.0
            state[key] = scale * (torch.rand(shape, generator=gen) + 0.5)
        elif key == "encoder_q.head.pool.p":
            state[key] = torch.tensor([2.7])
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:  # biases and GroupNorm affine
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.2 * torch.randn(shape, generator=gen)
    return state


@pytest.mark.parametrize("depth, size", [(50, (96, 128)), (101, (64, 80))])
def test_official_checkpoint_import(depth: int, size: tuple[int, int], tmp_path) -> None:
    """R50 through files (official .pyth -> self-contained checkpoint -> load); R101 in memory (speed)."""
    from retrieval_lightning.module import RetrievalModule

    state = random_official_state(depth)
    if depth == 50:
        source = tmp_path / f"CVPR2022_CVNet_R{depth}.pyth"
        torch.save({"model_state": state, "epoch": 1}, source)
        import_cvnet_checkpoint(str(source), str(tmp_path / "cvnet.ckpt"))
        module = RetrievalModule.load_from_checkpoint(tmp_path / "cvnet.ckpt").eval()
    else:
        backbone, heads = convert_official_state(state)
        module = RetrievalModule(backbone=backbone, heads=heads).eval()
    gen = torch.Generator().manual_seed(depth)
    images = torch.rand(2, 3, *size, generator=gen)
    bgr = (images.flip(1) - torch.tensor(IMAGENET_MEAN[::-1]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD[::-1]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = module.backbone(images)
        ours = module.heads["global"].embed(feats)
        torch.testing.assert_close(ours, global_descriptor(state, bgr, depth), atol=1e-5, rtol=0)
        ref_conv4, _ = pycls_resnet(state, bgr, depth)
        torch.testing.assert_close(feats["conv4"], ref_conv4, atol=1e-4, rtol=1e-4)
        verifier = module.heads["verifier"]
        fast = verifier.pair_logits(verifier.project(feats["conv4"][:1]), verifier.project(feats["conv4"]))
        ref = torch.cat([reference_logits(state, ref_conv4[:1], ref_conv4[k : k + 1]) for k in range(2)])
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


def test_official_import_lists_what_does_not_fit(tmp_path) -> None:
    state = random_official_state(50)
    del state["cv_learner.mlp.2.bias"]
    state["encoder_q.extra.weight"] = torch.zeros(3)
    state["conv2ds.1.weight"] = torch.zeros(8, 1024, 3, 3)
    torch.save(state, tmp_path / "bad.pyth")
    with pytest.raises(CheckpointImportError) as info:
        import_cvnet_checkpoint(str(tmp_path / "bad.pyth"), str(tmp_path / "out.ckpt"))
    message = str(info.value)
    assert "heads.verifier.learner.mlp.2.bias" in message and "encoder_q.extra.weight" in message
    assert "conv2ds.1.weight (8, 1024, 3, 3)" in message
    with pytest.raises(CheckpointImportError, match=r"not a state dict of tensors: 1 entries .*model_state \(list\)"):
        convert_official_state({"model_state": [1, 2]})  # a model_state that is no dict is left unwrapped
    state = random_official_state(50)
    state["conv2ds.0.weight"] = torch.tensor(1.0)  # 0-d: named as mis-shaped, not an IndexError
    with pytest.raises(CheckpointImportError, match=r"conv2ds\.0\.weight \(\)"):
        convert_official_state(state)


def test_official_import_takes_a_wrapped_state_and_names_a_converted_one(tmp_path) -> None:
    """Keys saved from a DataParallel/DDP wrapper (``module.``) import; a checkpoint of this framework
    passed back in is named as such instead of failing on the ResNet depth."""
    state = {f"module.{k}": v for k, v in random_official_state(50).items()}
    torch.save({"model_state": state}, tmp_path / "wrapped.pyth")
    import_cvnet_checkpoint(str(tmp_path / "wrapped.pyth"), str(tmp_path / "out.ckpt"))
    with pytest.raises(CheckpointImportError, match="not an official CVNet checkpoint.*pass it to --ckpt_path"):
        import_cvnet_checkpoint(str(tmp_path / "out.ckpt"), str(tmp_path / "again.ckpt"))


def test_explain_is_the_score_and_the_scale_one_correlation() -> None:
    """explain(): the same score as score(), heat = each location's best clamped cosine at scale 1,
    lines = mutual nearest neighbours strongest first, at cell centres; an image against itself
    matches every drawn cell to itself."""
    from heads.cvnet_verifier import EXPLAIN_MATCHES

    head = make_head()
    g = torch.Generator().manual_seed(3)
    query = entry_from_conv4(head, torch.randn(1, 24, 6, 8, generator=g))
    cand = entry_from_conv4(head, torch.randn(1, 24, 5, 7, generator=g))
    out = head.explain(query, cand)
    assert out.score == pytest.approx(float(head.score(query, [cand], [0])[0]), abs=1e-7)
    q = F.normalize(query["level2"].float(), dim=1)
    d = F.normalize(cand["level2"].float(), dim=1)
    corr = (q @ d.t()).clamp_min(0)
    torch.testing.assert_close(torch.from_numpy(out.query_heat), corr.max(1).values.reshape(6, 8))
    torch.testing.assert_close(torch.from_numpy(out.candidate_heat), corr.max(0).values.reshape(5, 7))
    assert 0 < len(out.matches) <= EXPLAIN_MATCHES and (out.matches > 0).all() and (out.matches < 1).all()
    assert (out.strengths[:-1] >= out.strengths[1:]).all()
    for (qx, qy, cx, cy), strength in zip(out.matches, out.strengths):
        i = round(qy * 6 - 0.5) * 8 + round(qx * 8 - 0.5)
        j = round(cy * 5 - 0.5) * 7 + round(cx * 7 - 0.5)
        assert int(corr[i].argmax()) == j and int(corr[:, j].argmax()) == i
        assert strength == pytest.approx(float(corr[i, j]), abs=1e-6)

    same = head.explain(query, query)
    assert len(same.matches) == min(EXPLAIN_MATCHES, 6 * 8)
    np.testing.assert_allclose(same.matches[:, :2], same.matches[:, 2:])
    np.testing.assert_allclose(same.query_heat, 1.0, atol=1e-5)


def test_border_cells_are_dropped_in_training_and_scoring_alike() -> None:
    """``border: 1`` zeroes the outer ring of every projected level large enough to keep an inside:
    the stored rows there are zero, and the score equals the plain head's score of the same entries
    with those rows zeroed (a zero row correlates with nothing). Training reads the same levels."""
    plain, cut = make_head(), make_head(border=1)
    cut.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(4)
    maps = [torch.randn(1, 24, 6, 8, generator=g), torch.randn(1, 24, 6, 7, generator=g)]
    entries = [entry_from_conv4(cut, m) for m in maps]
    plain_entries = [entry_from_conv4(plain, m) for m in maps]
    zeroed = [{k: v.clone() for k, v in e.items()} for e in plain_entries]
    for entry, ref in zip(entries, zeroed):
        for i in range(3):
            h, w = entry[f"level{i}_hw"].tolist()
            assert h > 2 and w > 2  # every level of these maps has an inside
            ring = torch.ones(h, w, dtype=torch.bool)
            ring[1:-1, 1:-1] = False
            assert entry[f"level{i}"].reshape(h, w, -1)[ring].abs().max() == 0
            ref[f"level{i}"].reshape(h, w, -1)[ring] = 0
            torch.testing.assert_close(entry[f"level{i}"], ref[f"level{i}"], atol=1e-3, rtol=0)
    with_border = cut.score(entries[0], entries[1:], [0])
    torch.testing.assert_close(with_border, plain.score(zeroed[0], zeroed[1:], [0]))
    assert not torch.allclose(with_border, plain.score(plain_entries[0], plain_entries[1:], [0]))
    # what a stored (e.g. densified, filled) entry holds at the edge never reaches the score
    torch.testing.assert_close(cut.score(plain_entries[0], plain_entries[1:], [0]), with_border)
    heat = cut.explain(plain_entries[0], plain_entries[1]).query_heat  # and is not drawn as evidence
    assert heat[0].max() == heat[:, -1].max() == 0 and heat[1:-1, 1:-1].min() > 0
    levels = cut.project(maps[0])
    assert all(level[..., 0, :].abs().max() == 0 for level in levels)  # the training path too

    small = torch.randn(1, 24, 2, 3, generator=g)  # levels of at most 2 rows: left whole
    torch.testing.assert_close(entry_from_conv4(cut, small)["level2"], entry_from_conv4(plain, small)["level2"])
    with pytest.raises(ValueError, match="border"):
        CVNetVerifierHead(border=-1)


def test_real_photos_fast_scores_match_the_straightforward_cvnet() -> None:
    """#9's parity on real photos without ../shared: scikit-image's photos through the ImageNet
    EfficientNet-Lite0, stored fp32 entries scored by the fast path == the straightforward CVNet."""
    from skimage import data as photos

    from _cvnet_parity import fast_and_reference_probabilities

    def photo(image, size: tuple[int, int]) -> torch.Tensor:
        rgb = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0
        return F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]

    images = [photo(photos.astronaut(), (160, 192)), photo(photos.astronaut()[:, ::-1], (160, 192)),
              photo(photos.coffee(), (144, 176)), photo(photos.chelsea(), (176, 160))]
    scores, reference = fast_and_reference_probabilities(images)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=0)
    assert scores.max() - scores.min() > 50 * 1e-4  # the pairs differ by far more than the tolerance
