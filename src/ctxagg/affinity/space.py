"""The design space as data: what each registered affinity is (paper, static/dynamic, which entries of A may be
non-zero, the cost of A·V), and where each paper of the reading list (``shared/papers/reading_list.txt``)
stands in ctxagg. ``ctxagg space`` prints both; ``tests/test_space_patterns.py`` checks that every registered
name has an entry, so a new operator cannot be registered without saying what it is."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpaceEntry", "DESIGN_SPACE", "COMBINATOR_EXAMPLES", "READING_LIST"]


@dataclass(frozen=True)
class SpaceEntry:
    """One affinity: the paper(s) it comes from, whether A depends on the input, its sparsity pattern and the
    cost of forming A·V for N tokens of C channels (k: kernel, w: window, s: stripe, r: rank, L/G: local and
    global keys of a sparse pattern), and its place in ViT-as-DynConv's kernel-bank frame (Table 1)."""
    paper: str
    kind: str
    pattern: str
    cost: str
    # ViT-as-DynConv §3.3 / Table 1: where the kernels come from, how each position picks its kernel, how a
    # kernel maps channels (C→1→C: a C→1 key kernel then a 1→C value kernel, as in self-attention) and its extent
    bank: str
    selection: str
    kernel_type: str
    kernel_size: str


DESIGN_SPACE: dict[str, SpaceEntry] = {
    "sa": SpaceEntry("Vaswani et al.; ViT; ViT-as-DynConv §4.2 normalisers", "dynamic", "dense", "N²·C",
        bank="dynamic", selection="hard (all)", kernel_type="C→1→C", kernel_size="1×1"),
    "dw": SpaceEntry("Container Eq. 7 (depth-wise conv)", "static", "banded k×k, per channel", "N·k²·C",
        bank="static (one kernel)", selection="none", kernel_type="depth-wise", kernel_size="k×k"),
    "mhdw": SpaceEntry("Container Table 2 (MH-DW)", "static", "banded k×k, per head", "N·k²·C",
        bank="static (one kernel)", selection="none", kernel_type="depth-wise, shared per head", kernel_size="k×k"),
    "conv": SpaceEntry("Container Table 2 (conv)", "static", "banded k×k over (position, channel)", "N·k²·C²",
        bank="static (one kernel)", selection="none", kernel_type="C→C", kernel_size="k×k"),
    "gconv": SpaceEntry("Container Table 2 (group conv)", "static", "banded k×k, block per group", "N·k²·C²/G",
        bank="static (one kernel)", selection="none", kernel_type="C→C within groups", kernel_size="k×k"),
    "mlp": SpaceEntry("MLP-Mixer token MLP; Container Eq. 8", "static", "dense, fixed N", "N²·C",
        bank="static (one kernel)", selection="none", kernel_type="depth-wise, shared by all channels", kernel_size="H×W (global)"),
    "mlp_lr": SpaceEntry("Container Table 2 (MLP-LR)", "static", "dense, rank r, fixed N", "2·N·r·C",
        bank="static (one kernel)", selection="none", kernel_type="depth-wise, shared by all channels", kernel_size="H×W (global, rank r)"),
    "mh_mlp_lr": SpaceEntry("Container Table 2 (MH-MLP-LR)", "static", "dense, rank r per head, fixed N",
                            "2·N·r·C",
        bank="static (one kernel)", selection="none", kernel_type="depth-wise, shared per head", kernel_size="H×W (global, rank r)"),
    "key_only": SpaceEntry("LinGlos Eq. 2-4 (key-only attention)", "dynamic", "rank one, gated by V", "N·C",
        bank="dynamic (keys)", selection="soft (softmax over all keys, pooled to one kernel)", kernel_type="depth-wise", kernel_size="1×1"),
    "dw_sa": SpaceEntry("ViT-as-DynConv Eq. 5 (depth-wise self-attention)", "dynamic",
                        "diagonal + relative term", "N·C",
        bank="dynamic (keys only)", selection="hard (all), averaged", kernel_type="depth-wise", kernel_size="1×1"),
    "window": SpaceEntry("Image Transformer; Swin §3.2; Twins LSA", "dynamic", "block-diagonal w×w windows",
                         "N·w²·C",
        bank="dynamic", selection="hard (local window)", kernel_type="C→1→C", kernel_size="1×1"),
    "shifted_window": SpaceEntry("Swin §3.2 (shifted windows)", "dynamic", "block-diagonal after a cyclic shift",
                                 "N·w²·C",
        bank="dynamic", selection="hard (local window, shifted)", kernel_type="C→1→C", kernel_size="1×1"),
    "neighbourhood": SpaceEntry("Stand-Alone Self-Attention Eq. 3; Local Relation Networks", "dynamic",
                                "banded k×k around each query", "N·k²·C",
        bank="dynamic", selection="hard (local, sliding k×k)", kernel_type="C→1→C", kernel_size="1×1"),
    "axial_row": SpaceEntry("Axial Attention §3; Axial-DeepLab", "dynamic", "same row", "N·W·C",
        bank="dynamic", selection="hard (same row)", kernel_type="C→1→C", kernel_size="1×1"),
    "axial_column": SpaceEntry("Axial Attention §3; Axial-DeepLab", "dynamic", "same column", "N·H·C",
        bank="dynamic", selection="hard (same column)", kernel_type="C→1→C", kernel_size="1×1"),
    "axial": SpaceEntry("Axial Attention §3 (row then column)", "dynamic", "product of row and column: dense",
                        "N·(H+W)·C",
        bank="dynamic", selection="hard (row, then column)", kernel_type="C→1→C, twice", kernel_size="1×1"),
    "conv_attn": SpaceEntry("Cordonnier et al. Lemma 1 (attention that is a conv)", "static",
                            "dense softmax kernel, K² shifted heads", "N²·C",
        bank="static (positional logits)", selection="soft, fixed", kernel_type="C→1→C per head", kernel_size="1×1 (K² heads ≈ K×K conv)"),
    "cswin": SpaceEntry("CSWin §3.2 (cross-shaped windows)", "dynamic",
                        "block-diagonal stripes: rows for half the heads, columns for the other half",
                        "N·s·(H+W)/2·C",
        bank="dynamic", selection="hard (local stripe)", kernel_type="C→1→C", kernel_size="1×1"),
    "shuffle_window": SpaceEntry("Shuffle Transformer §3.2; MobileViT's patch-position groups", "dynamic",
                                 "block-diagonal after a spatial shuffle (image-wide dilated windows)", "N·w²·C",
        bank="dynamic", selection="hard (dilated window)", kernel_type="C→1→C", kernel_size="1×1"),
    "linformer": SpaceEntry("Linformer §4 Eq. 7 (keys and values projected along the tokens)", "dynamic",
                            "dense, rank ≤ k, fixed N (linformer<k>; default k = min(N, 256))", "N·k·C",
        bank="dynamic", selection="soft (k learned mixtures of the N key kernels)", kernel_type="C→1→C",
        kernel_size="1×1"),
    "performer": SpaceEntry("Performers §3 (FAVOR+: positive orthogonal random features)", "dynamic",
                            "dense, rank ≤ m, approximates softmax (performer<m>; default m = 256)", "N·m·C",
        bank="dynamic", selection="hard (all), kernelised softmax", kernel_type="C→1→C", kernel_size="1×1"),
    "sra": SpaceEntry("PVT §3.3 Eq. 2-4 (spatial-reduction attention); Twins GSA", "dynamic",
                      "dense: softmax over N/R² reduced keys times the stride-R conv, over (position, channel) "
                      "(sra<R>; default 4)", "N·(N/R²)·C + N·C²",
        bank="dynamic (one kernel per R×R patch)", selection="hard (all reduced)", kernel_type="C→1→C",
        kernel_size="R×R (reduced)"),
    "sra_pool": SpaceEntry("PVTv2 §3.3 (linear SRA: pooled keys and values)", "dynamic",
                           "dense: softmax over P² pooled keys times the pooling (sra_pool<P>; default 7)", "N·P²·C",
        bank="dynamic (pooled to P×P)", selection="hard (all pooled)", kernel_type="C→1→C",
        kernel_size="≈ H/P × W/P (pooled)"),
    "pool_attn": SpaceEntry("MViT §3.1 (pooling attention)", "dynamic",
                            "dense over keys pooled with stride s, per channel; N_out×N with a query stride "
                            "(operator level) (pool_attn<s>; default 2)", "N·(N/s²)·C",
        bank="dynamic (pooled with stride s)", selection="hard (all pooled)", kernel_type="C→1→C",
        kernel_size="3×3 (channel-wise pooling)"),
    "lambda": SpaceEntry("LambdaNetworks §3-4 (content + position lambdas, lambda convolution)", "dynamic",
                         "dense content term (rank ≤ d per head) + banded r×r position term (lambda<r>; default 23)",
                         "N·r²·d·C",
        bank="dynamic (content lambda) + static (position embeddings)",
        selection="soft (keys softmax-normalised over positions, pooled to one lambda) + local r×r",
        kernel_type="d→d per head (the lambda applied to the query)", kernel_size="H×W (content) + r×r (position)"),
    "mix(<dynamic>,<static>)": SpaceEntry("Container Eq. 9 (α·A_dyn + β·A_static)", "both", "union of the parts",
                                          "sum of the parts",
        bank="both parts' banks", selection="both parts' rules, summed", kernel_type="the parts'", kernel_size="the parts'"),
    "chain(...)": SpaceEntry("product of affinities (A_b·A_a)", "parts'", "product of the parts' patterns",
                             "sum of the parts",
        bank="the parts'", selection="the parts' rules, composed", kernel_type="the parts'", kernel_size="the parts', composed"),
    "masked(...)": SpaceEntry("Longformer §3.1; Sparse Transformers §4.2; Vision Longformer", "dynamic",
                              "fixed sparse pattern: band, dilated, row, column, global tokens", "N·(L+2G)·C",
        bank="dynamic", selection="hard (fixed sparse pattern)", kernel_type="C→1→C", kernel_size="1×1"),
}

# one concrete instance per combinator, for the table's measured columns
COMBINATOR_EXAMPLES = {"mix(<dynamic>,<static>)": "mix(sa,dw5)", "chain(...)": "chain(window7,neighbourhood3)",
                       "masked(...)": "masked(sa,band7+global8)"}

# (reading-list title, where it stands): a ctxagg name, a part-2 operator (how A is generated: issue
# [space-generators]), or why it is not a spatial-mixer design
READING_LIST: list[tuple[str, str]] = [
    ("Convolutional Sequence to Sequence Learning", "conv<k>: a convolution is the banded static affinity"),
    ("Attention Is All You Need", "sa"),
    ("An Image is Worth 16x16 Words (ViT)", "sa (deit_s rows)"),
    ("Rethinking and Improving Relative Position Encoding (iRPE)",
     "partly: relative bias in window/neighbourhood; contextual mode is part 2 (pre-softmax bias)"),
    ("SimMIM", "not a mixer: masked-image pre-training"),
    ("Going deeper with Image Transformers (CaiT)", "part 2: talking heads (head mixing)"),
    ("DeepViT", "part 2: re-attention (head mixing)"),
    ("DeLighT", "not a spatial mixer: depth/width scaling of NLP transformers"),
    ("LambdaNetworks", "lambda (content lambda + lambda-convolution position lambdas; lambda<r>)"),
    ("CrossViT", "not yet: cross-attention between two token sets of different sizes (a non-square affinity)"),
    ("On the Relationship between Self-Attention and Convolutional Layers", "conv_attn"),
    ("Stand-Alone Self-Attention in Vision Models", "neighbourhood"),
    ("Exploring Self-attention for Image Recognition (SAN)",
     "not yet: vector attention (a weight per channel from an MLP of the pair) over neighbourhoods"),
    ("Generating Long Sequences with Sparse Transformers", "masked(sa, row+column) (strided, non-causal)"),
    ("Longformer", "masked(sa, band<k>+dilated<k>_<d>+global<s>)"),
    ("Image Transformer", "window (local 2-D blocks)"),
    ("Blockwise Self-Attention for Long Document Understanding", "window (block-diagonal; 1-D case)"),
    ("Reformer", "not yet: LSH buckets make the sparsity pattern input-dependent; masked() takes fixed patterns"),
    ("Linformer", "linformer (low-rank projection along tokens; linformer<k>, fixed N)"),
    ("Rethinking Attention with Performers", "performer (FAVOR+ positive orthogonal random features; performer<m>)"),
    ("Scaling Autoregressive Video Models", "window (its 3-D blocks in 2-D; no time axis)"),
    ("Axial Attention in Multidimensional Transformers", "axial = chain(axial_row, axial_column)"),
    ("Axial-DeepLab", "axial (without the position-sensitive terms)"),
    ("CoAtNet", "dw stages + part 2 (pre-softmax relative attention)"),
    ("Self-supervised Pretraining of Visual Features in the Wild (SEER)", "not a mixer: pre-training at scale"),
    ("Scaling Vision Transformers", "sa (a scaling study)"),
    ("LeViT", "part 2: attention bias before the softmax"),
    ("CvT", "part 2: convolutional q/k/v projections"),
    ("Exploring the Limits of Weakly Supervised Pretraining", "not a mixer: pre-training data"),
    ("Self-training with Noisy Student", "not a mixer: semi-supervised training"),
    ("Big Transfer (BiT)", "not a mixer: transfer learning"),
    ("Twins", "window (LSA) + sra (GSA: spatial-reduction attention)"),
    ("CSWin Transformer", "cswin (+ LePE: mix(cswin, dw3))"),
    ("Shuffle Transformer", "shuffle_window"),
    ("LocalViT", "dw, in the channel MLP rather than the spatial mixer (the mixer slot's dw3 is the same operator)"),
    ("Early Convolutions Help Transformers See Better", "not a mixer: a convolutional stem"),
    ("Focal Self-attention", "not yet: fine local keys plus pooled coarse keys (part 2's pooled affinities)"),
    ("VOLO", "part 2: outlook attention"),
    ("Multi-Scale Vision Longformer", "masked(sa, band<k>+global<s>) (global tokens designated in the grid)"),
    ("Multiscale Vision Transformers (MViT)", "pool_attn (pooling attention; query pooling, N_out×N, at the operator level)"),
    ("Visformer", "per-stage mixers: conv/dw stages then sa (ContainerNet(mixers=...))"),
    ("Incorporating Convolution Designs into Visual Transformers (CeiT)",
     "not a spatial mixer: conv stem and dw conv in the feed-forward"),
    ("Local Relation Networks", "neighbourhood (geometry prior as relative logits)"),
    ("Disentangled Non-Local Neural Networks", "part 2: whitened pairwise + unary terms"),
    ("OCNet", "sa over pixels (object context)"),
    ("Bottleneck Transformers (BoTNet)", "RelativeSelfAttention2d (resnet50_sa)"),
    ("Attention Augmented Convolutional Networks", "AttentionAugmentedConv (resnet50_aa)"),
    ("Relation Networks for Object Detection", "not a grid affinity: relations between detected boxes"),
    ("Learning Region Features for Object Detection", "not a backbone mixer: region feature extraction"),
    ("Training data-efficient image transformers (DeiT)", "sa (deit_s, deit_b)"),
    ("Tokens-to-Token ViT", "not a mixer: tokenisation by soft split"),
    ("Conditional Positional Encodings (CPE)", "dw (x + dw3(x) before every block)"),
    ("Transformer in Transformer", "window at pixel level (inner) + sa (outer): per-level mixers"),
    ("Pyramid Vision Transformer", "sra (spatial-reduction attention) + sra_pool (PVTv2's linear SRA)"),
    ("ConViT", "part 2: gated positional self-attention (a mixture of content and position)"),
    ("Mobile-Former", "not yet: cross-attention between a few tokens and the map (non-square)"),
    ("Rethinking Spatial Dimensions of Vision Transformers (PiT)", "not a mixer: pooling between stages"),
    ("A Closer Look at Local Aggregation Operators in Point Cloud Analysis", "not a grid affinity: point clouds"),
    ("SchNet", "not a grid affinity: continuous filters on atom positions"),
    ("Deep Parametric Continuous Convolutional Neural Networks", "not a grid affinity: continuous conv on points"),
    ("Segmenting Transparent Object in the Wild with Transformer", "not a backbone mixer: a segmentation decoder"),
    ("TransTrack", "not a backbone mixer: tracking queries"),
    ("UniT", "not a backbone mixer: multi-task, multi-modal decoder"),
    ("Visual Saliency Transformer", "not a new mixer: T2T tokens + sa"),
    ("RelationNet++", "not a backbone mixer: a detection decoder"),
    ("MobileViT", "shuffle_window (pixels at the same place in each patch attend to each other) + conv"),
    ("Separable Self-attention for Mobile Vision Transformers", "part 2: separable (rank-one) attention"),
    ("Swin Transformer", "window + shifted_window (swin_t, swin_b)"),
    ("Swin Transformer V2", "not yet: scaled cosine attention and log-spaced continuous position bias"),
    ("Dynamic Head", "not a backbone mixer: attention in the detection head"),
    ("Fastformer", "part 2: additive attention"),
    ("Mask DINO", "not a mixer: a detection/segmentation framework"),
    ("Aggregated Pyramid Vision Transformer", "sa in grouped (split-transform-merge) encoders: per-group heads of sa"),
]
