"""Tiny stand-ins for insightface's ``antelopev2`` face-analysis pack, written as ONNX files with the
file names, input/output names and shapes of the real detector and recogniser, so that
insightface's own ``FaceAnalysis(name="antelopev2", root=...)`` loading, routing, detection,
alignment and embedding code runs offline, unchanged.

Files (``<root>/models/antelopev2/``):

- ``scrfd_10g_bnkps.onnx``, the detector. Input ``input.1`` float ``[1, 3, ?, ?]`` (RGB,
  ``(pixel − 127.5) / 128``, as insightface's ``SCRFD`` feeds it). Nine outputs, SCRFD's layout
  for 3 strides (8, 16, 32) × 2 anchors with keypoints: scores ``448, 471, 494`` ``[N_s, 1]``,
  box distances ``451, 474, 497`` ``[N_s, 4]``, keypoint offsets ``454, 477, 500`` ``[N_s, 10]``
  (``N_s = H/s · W/s · 2``; declared for the 640×640 input insightface uses, as in the released
  file). insightface routes it to ``SCRFD`` because it has ≥ 5 outputs.
- ``glintr100.onnx``, the recogniser. Input ``input.1`` float ``[None, 3, 112, 112]`` (RGB,
  ``(pixel − 127.5) / 127.5``), output ``1333`` ``[1, 512]``. insightface routes it to
  ``ArcFaceONNX`` because its input is square, ≥ 112 and a multiple of 16.

The real pack also holds ``1k3d68.onnx``, ``2d106det.onnx`` and ``genderage.onnx``, which InstantID
does not use (Easel loads only detection and recognition).

**What the tiny detector does, by construction of its graph** (no learned weights): a pixel is
"face" when its red channel exceeds its green channel by ≥ 96 levels (a saturated red/magenta
patch; grey, white, black, skin tones, green and blue are background). On the stride-32 grid each
anchor sums the face mass in a 320×320 px window centred on it and computes the mass's centroid
and spread; it fires (score ≥ 0.75) when the centroid lies within 16 px of the anchor and the
mass covers 1–80 % of the window; the box is centroid ± √3·σ (exact for an axis-aligned
rectangle), and the five keypoints are ArcFace's canonical template placed in that box. Strides 8
and 16 never fire. So it finds each separated, roughly rectangular red patch of about 32–280 px
(in the 640 px detector input, i.e. about 5–44 % of the photo's longer side), one box each.

**What the tiny recogniser does**: a fixed random projection (seeded) of the aligned 112×112
crop, average-pooled to 14×14×3, to 512 numbers. Deterministic; different crop content (e.g. a
different blue channel or pattern inside the red patch) gives a different embedding; the same
crop gives the same one.

**What they cannot show**: anything about real faces. They do not detect human faces, their
keypoints are not facial landmarks, and their embeddings carry no identity: cosine similarity
between two tiny embeddings means nothing. They exist so the real loading and inference code,
the largest-face choice, keypoint drawing, alignment and the embedding's path into the
IP-Adapter run in tests; identity preservation can only be judged with the real pack.
"""
from __future__ import annotations

from pathlib import Path

DETECTOR = "scrfd_10g_bnkps.onnx"
RECOGNISER = "glintr100.onnx"
PACK = "antelopev2"
# ArcFace's 5-point template for a 112×112 crop (insightface ``face_align.arcface_dst``)
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))
SCORE_NAMES = ("448", "471", "494")
BOX_NAMES = ("451", "474", "497")
KPS_NAMES = ("454", "477", "500")
STRIDES = (8, 16, 32)
WINDOW_CELLS = 10  # 10 cells of 32 px = 320 px window


def build_detector():
    """The tiny SCRFD-shaped detector as an ``onnx.ModelProto`` (see the module docstring)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def c(name, arr, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        return name

    def n(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op.lower()}_{len(nodes)}", **attrs))
        return output

    c("c0", 0.0); c("c1", 1.0); c("half", 0.5); c("eps", 1e-6); c("three_sqrt", 3.0 ** 0.5)
    c("ax1", [1], np.int64); c("ax2", [2], np.int64); c("ax3", [3], np.int64)
    c("s0", [0], np.int64); c("s1", [1], np.int64); c("s2", [2], np.int64)
    # face-ness m = clip(4·(r − g) − 2, 0, 1) with r, g in SCRFD's normalised units (1 unit = 128 levels)
    r = n("Slice", ["input.1", "s0", "s1", "ax1"], "r")
    g = n("Slice", ["input.1", "s1", "s2", "ax1"], "g")
    c("k4", 4.0); c("k2", 2.0)
    d = n("Sub", [r, g], "rg")
    m = n("Clip", [n("Sub", [n("Mul", [d, "k4"], "rg4"), "k2"], "rg4m2"), "c0", "c1"], "m")
    ones = n("Add", [n("Mul", [m, "c0"], "zero_map"), "c1"], "ones")
    xs = n("Sub", [n("CumSum", [ones, "ax3"], "cumx"), "half"], "X")  # pixel centres
    ys = n("Sub", [n("CumSum", [ones, "ax2"], "cumy"), "half"], "Y")
    mx, my = n("Mul", [m, xs], "mx"), n("Mul", [m, ys], "my")
    feats = n("Concat", [m, mx, my, n("Mul", [mx, xs], "mxx"), n("Mul", [my, ys], "myy")], "feats", axis=1)
    c("cell_area", 32.0 * 32.0)
    cells = n("Mul", [n("AveragePool", [feats], "cells_avg", kernel_shape=[32, 32], strides=[32, 32]), "cell_area"], "cells")
    lo, hi = WINDOW_CELLS // 2, WINDOW_CELLS // 2 - 1
    c("win_cells", float(WINDOW_CELLS * WINDOW_CELLS))
    win = n("Mul", [n("AveragePool", [cells], "win_avg", kernel_shape=[WINDOW_CELLS, WINDOW_CELLS], strides=[1, 1],
                      pads=[lo, lo, hi, hi], count_include_pad=1), "win_cells"], "win")
    parts = [f"w{i}" for i in range(5)]
    nodes.append(helper.make_node("Split", [win, c("split5", [1, 1, 1, 1, 1], np.int64)], parts, name="split_moments", axis=1))
    mass = n("Add", ["w0", "eps"], "mass")
    cx, cy = n("Div", ["w1", mass], "cx"), n("Div", ["w2", mass], "cy")
    vx = n("Sub", [n("Div", ["w3", mass], "ex2"), n("Mul", [cx, cx], "cx2")], "vx")
    vy = n("Sub", [n("Div", ["w4", mass], "ey2"), n("Mul", [cy, cy], "cy2")], "vy")
    hx = n("Mul", [n("Sqrt", [n("Relu", [vx], "vxr")], "sx"), "three_sqrt"], "hx")
    hy = n("Mul", [n("Sqrt", [n("Relu", [vy], "vyr")], "sy"), "three_sqrt"], "hy")
    # anchor centres of the stride-32 grid: (j·32, i·32)
    c("stride32", 32.0)
    cell_ones = n("Add", [n("Mul", ["w0", "c0"], "zero_cells"), "c1"], "cell_ones")
    ax = n("Mul", [n("Sub", [n("CumSum", [cell_ones, "ax3"], "cumj"), "c1"], "j"), "stride32"], "anchor_x")
    ay = n("Mul", [n("Sub", [n("CumSum", [cell_ones, "ax2"], "cumi"), "c1"], "i"), "stride32"], "anchor_y")
    # score = fill in [1 %, 80 %] × nearness of the centroid to the anchor
    c("win_px", float((WINDOW_CELLS * 32) ** 2)); c("fill_lo", 0.01); c("fill_hi", 0.8); c("k1000", 1000.0)
    fill = n("Div", ["w0", "win_px"], "fill")
    ok_lo = n("Clip", [n("Mul", [n("Sub", [fill, "fill_lo"], "f_lo"), "k1000"], "f_lo_k"), "c0", "c1"], "ok_lo")
    ok_hi = n("Clip", [n("Mul", [n("Sub", ["fill_hi", fill], "f_hi"), "k1000"], "f_hi_k"), "c0", "c1"], "ok_hi")
    dist = n("Max", [n("Abs", [n("Sub", [cx, ax], "dx")], "adx"), n("Abs", [n("Sub", [cy, ay], "dy")], "ady")], "dist")
    c("k125", 1.25)
    near = n("Clip", [n("Sub", ["k125", n("Div", [dist, "stride32"], "dist_cells")], "near_raw"), "c0", "c1"], "near")
    score = n("Mul", [n("Mul", [ok_lo, ok_hi], "ok"), near], "score1")
    zero_cells = "zero_cells"
    # box distances in stride units: left, top, right, bottom
    x1, y1 = n("Sub", [cx, hx], "x1"), n("Sub", [cy, hy], "y1")
    x2, y2 = n("Add", [cx, hx], "x2"), n("Add", [cy, hy], "y2")
    dists = [n("Div", [n("Sub", [ax, x1], "dl"), "stride32"], "dl_s"), n("Div", [n("Sub", [ay, y1], "dt"), "stride32"], "dt_s"),
             n("Div", [n("Sub", [x2, ax], "dr"), "stride32"], "dr_s"), n("Div", [n("Sub", [y2, ay], "db"), "stride32"], "db_s")]
    c("two", 2.0)
    wbox, hbox = n("Mul", [hx, "two"], "wbox"), n("Mul", [hy, "two"], "hbox")
    kps = []
    for k, (tx, ty) in enumerate(ARCFACE_TEMPLATE):
        c(f"tx{k}", tx / 112.0); c(f"ty{k}", ty / 112.0)
        px = n("Add", [x1, n("Mul", [wbox, f"tx{k}"], f"kx{k}")], f"px{k}")
        py = n("Add", [y1, n("Mul", [hbox, f"ty{k}"], f"ky{k}")], f"py{k}")
        kps += [n("Div", [n("Sub", [px, ax], f"kdx{k}"), "stride32"], f"kdx{k}_s"),
                n("Div", [n("Sub", [py, ay], f"kdy{k}"), "stride32"], f"kdy{k}_s")]
    c("perm_shape1", [-1, 1], np.int64); c("perm_shape4", [-1, 4], np.int64); c("perm_shape10", [-1, 10], np.int64)

    def flat(chans, per_anchor, out_name, tag):
        maps = n("Concat", chans, f"{tag}_maps", axis=1)
        t = n("Transpose", [maps], f"{tag}_nhwc", perm=[0, 2, 3, 1])
        return n("Reshape", [t, f"perm_shape{per_anchor}"], out_name)

    outputs = {}
    for stride, sname, bname, kname in zip(STRIDES, SCORE_NAMES, BOX_NAMES, KPS_NAMES):
        if stride == 32:
            z = zero_cells
            outputs[sname] = flat([score, z], 1, sname, "s32")
            outputs[bname] = flat(dists + dists, 4, bname, "b32")
            outputs[kname] = flat(kps + kps, 10, kname, "k32")
        else:
            z = n("Mul", [n("AveragePool", [m], f"pool{stride}", kernel_shape=[stride, stride], strides=[stride, stride]),
                          "c0"], f"zero{stride}")
            outputs[sname] = flat([z, z], 1, sname, f"s{stride}")
            outputs[bname] = flat([z] * 8, 4, bname, f"b{stride}")
            outputs[kname] = flat([z] * 20, 10, kname, f"k{stride}")
    counts = {s: (640 // s) ** 2 * 2 for s in STRIDES}
    outs = []
    for names, width in ((SCORE_NAMES, 1), (BOX_NAMES, 4), (KPS_NAMES, 10)):
        for stride, name in zip(STRIDES, names):
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [counts[stride], width]))
    graph = helper.make_graph(nodes, "tiny-scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="easel-tiny")
    model.ir_version = 8
    return model


def build_recogniser(seed: int = 7):
    """The tiny ArcFace-shaped recogniser as an ``onnx.ModelProto`` (see the module docstring)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    features = 3 * 14 * 14
    weight = (rng.standard_normal((features, 512)) * (2.0 / np.sqrt(features))).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["1333"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("1333", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(weight, "projection")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="easel-tiny")
    model.ir_version = 8
    return model


def write_face_pack(root: Path) -> Path:
    """Write the tiny pack as ``<root>/models/antelopev2/{scrfd_10g_bnkps,glintr100}.onnx``; return the pack folder.

    ``root`` is what insightface's ``FaceAnalysis(name="antelopev2", root=root)`` takes.
    """
    import onnx

    folder = Path(root) / "models" / PACK
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in ((DETECTOR, build_detector()), (RECOGNISER, build_recogniser())):
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / name))
    return folder


def draw_test_face(image, box: tuple[int, int, int, int], variant: int = 0) -> None:
    """Paint a "face" the tiny detector finds into a PIL RGB ``image`` (in place).

    ``box`` = ``(x0, y0, x1, y1)``; a red patch (R − G = 180) whose blue channel and two "eye"
    squares depend on ``variant``, so different variants give different tiny embeddings.
    """
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    blue = (40, 200, 120, 0)[variant % 4]
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(220, 40, blue))
    w, h = x1 - x0, y1 - y0
    eye = (230, 50, 255 - blue)
    for ex in (0.3, 0.62):
        ex0, ey0 = x0 + int(w * ex), y0 + int(h * (0.4 + 0.05 * variant))
        draw.rectangle([ex0, ey0, ex0 + max(2, w // 10), ey0 + max(2, h // 10)], fill=eye)
