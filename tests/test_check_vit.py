"""`lighten check` on a ViT written as a new user would, and the report's size plot and widths.

Issue 10 (Friction): check claimed "ONNX trace froze Python control flow: forward line 6838"
(a line inside torch) on every row although the export matched, and "never called in forward"
for Linears that are used. Its answers now come from trying: the export is run by ONNX Runtime
on other inputs and a claim names the user's line; a module whose parameters are read is used.
"""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

from lighten import runner
from lighten.check import check_model
from lighten.cli.main import main
from lighten.measure.macs import count_macs
from lighten.recipe import load_recipe
from lighten.report import size_figure, width_rows


class TinyViT(nn.Module):
    """Patch embedding conv, cls token, positional embedding, PyTorch's encoder, head."""

    def __init__(self, dim=32, depth=2, heads=4, patch=7, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (28 // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


class FunctionalAttention(nn.Module):
    """A hand-written block that passes out_proj's weights to F.multi_head_attention_forward:
    out_proj is never *called*, but it is used."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * 0.1)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):  # (T, B, D)
        out, _ = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.heads, self.in_proj_weight, self.in_proj_bias,
            None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias,
            training=False, need_weights=False)
        return out


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = FunctionalAttention()
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 4)
        y = self.attn(self.embed(x).transpose(0, 1)).transpose(0, 1)
        return self.head(y.mean(1))


class Branchy(nn.Module):
    """Real data-dependent control flow: the export keeps the branch the example took."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # the frozen line
            x = x * 2
        return self.head(x.flatten(1))


def by_name(rows):
    return {r.name: r for r in rows}


def why(rows) -> str:
    return " ".join(w for r in rows for w in r.why_not)


@pytest.fixture(scope="module")
def vit_rows():
    torch.manual_seed(0)
    model = TinyViT()
    return model, check_model(model, (1, 28, 28))


def test_vit_export_matches_so_no_frozen_claim(vit_rows):
    _, rows = vit_rows
    assert "froze" not in why(rows)  # torch's own TracerWarnings are no claim: the export matches
    assert all(r.cells["exportable"] == "yes" for r in rows)


def test_vit_used_linears_are_not_never_called(vit_rows):
    _, rows = vit_rows
    named = by_name(rows)
    assert "never called" not in why(rows)
    for name in ("encoder.layers.0.self_attn.out_proj", "encoder.layers.1.linear1", "head"):
        assert named[name].cells["traceable"] == "yes"
        assert named[name].cells["measurable"] == "yes"


def test_vit_rows_sum_to_the_model(vit_rows):
    model, rows = vit_rows
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    named = by_name(rows)
    assert named["(model)"].params == model.cls_token.numel() + model.pos.numel()
    attn = model.encoder.layers[0].self_attn
    assert named["encoder.layers.0.self_attn"].params == (attn.in_proj_weight.numel()
                                                          + attn.in_proj_bias.numel())
    # MACs are counted with the fused attention path off: attention is not free, and the rows
    # add up to what `lighten measure` reports
    assert named["encoder.layers.0.self_attn"].macs > 0
    assert sum(r.macs or 0 for r in rows) == count_macs(model, (1, 28, 28))


def test_vit_heads_and_pruning_answers_come_from_the_steps(vit_rows):
    _, rows = vit_rows
    named = by_name(rows)
    assert named["encoder.layers.0.self_attn"].cells["prunable (heads)"] == "yes"
    # prune.magnitude run on a copy: layers with a matrix weight gained zeros
    assert named["encoder.layers.0.linear1"].cells["prunable"] == "yes"
    assert named["encoder.layers.0.norm1"].cells["prunable"] == "no"


def test_parameters_read_functionally_count_as_used():
    rows = by_name(check_model(AttentionNet(), (5, 4)))
    out_proj = rows["attn.out_proj"]
    assert out_proj.cells["traceable"] == "yes"
    assert out_proj.cells["measurable"] == "yes"
    assert "never called" not in " ".join(out_proj.why_not)
    assert rows["attn"].params == 16 * 48 + 48  # in_proj held by the block itself


def test_unused_linear_is_still_never_called():
    model = AttentionNet()
    model.spare = nn.Linear(2, 2)
    spare = by_name(check_model(model, (5, 4)))["spare"]
    assert spare.cells["measurable"] == "no"
    assert "never called" in " ".join(spare.why_not)


def test_real_control_flow_is_claimed_at_the_users_line():
    torch.manual_seed(0)
    rows = by_name(check_model(Branchy(), (1, 8, 8)))  # the export keeps the example's branch
    for row in rows.values():
        assert row.cells["exportable"] == "frozen"
        text = " ".join(row.why_not)
        assert "test_check_vit.py:" in text and "`if x.sum() > 0:  # the frozen line`" in text
        assert "differs from PyTorch" in text
        assert "functional.py" not in text


def test_cli_check_names_the_users_file(tmp_path, capsys):
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3)
                self.head = nn.Linear(4 * 6 * 6, 3)

            def forward(self, x):
                x = self.conv(x)
                if x.mean() > 0:
                    x = -x
                return self.head(x.flatten(1))

        def build(num_classes=3, input_shape=None):
            return Net()
    """))
    assert main(["check", f"{tmp_path / 'branchy.py'}:build", "--input-shape", "1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "branchy.py:13 (`if x.mean() > 0:`)" in out
    assert "exportable 0/2" in out


# ----------------------------------------------------------------------------------- report


def test_size_plot_labels_do_not_overlap():
    rows = [{"stage": "baseline", "bytes": 246_000, "accuracy": 0.9712},
            {"stage": "prune.magnitude", "bytes": 246_000, "accuracy": 0.9701},  # same size
            {"stage": "prune.channels", "bytes": 240_000, "accuracy": 0.9650},
            {"stage": "quant.ptq", "bytes": 61_500, "accuracy": 0.9620},
            {"stage": "quant.weight_only.a_very_long_stage_name_indeed", "bytes": 20_500,
             "accuracy": 0.95}]
    fig = size_figure(rows)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible())
             if t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    assert any("quant.weight_only" in s for s, _ in boxes)
    assert any("4.0x smaller" in s for s, _ in boxes)
    frame = fig.bbox
    for i, (a, box) in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 + 1, f"{a!r} leaves the figure"
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1 + 1, f"{a!r} leaves the figure"
        for b, other in boxes[i + 1:]:
            assert not box.overlaps(other), f"{a!r} overlaps {b!r}"


def test_width_rows_from_a_report():
    layers = [{"module": "conv1", "action": "resize", "type": "Conv2d",
               "shape_before": [16, 1, 3, 3], "shape_after": [8, 1, 3, 3]},
              {"module": "bn1", "action": "resize", "type": "BatchNorm2d",
               "shape_before": [16], "shape_after": [8]},
              {"module": "up", "action": "resize", "type": "ConvTranspose2d",
               "shape_before": [8, 16, 2, 2], "shape_after": [8, 12, 2, 2]},
              {"module": "fc", "action": "quantize", "type": "Linear"}]
    assert width_rows(layers) == [["conv1", "Conv2d", "16 → 8", "1 → 1", "50.00%"],
                                  ["up", "ConvTranspose2d", "16 → 12", "8 → 8", "75.00%"]]


MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))

def build():
    return Net()
"""


def test_report_shows_widths_and_size_plot_after_prune_channels(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""
        name: widths
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 128, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
          - prune.channels: {{ratio: 0.5}}
    """))
    result = runner.run_recipe(load_recipe(tmp_path / "recipe.yaml"), progress=False)
    out = result.output_dir
    layers = json.loads((out / "stages" / "01-prune.channels.report.json").read_text())["layers"]
    conv = next(r for r in layers if r["module"] == "conv")
    kept = conv["shape_after"][0]
    assert kept < 16
    text = (out / "report.md").read_text()
    assert "## Widths: prune.channels" in text
    section = text.split("## Widths: prune.channels")[1].split("\n## ")[0].splitlines()
    line = next(s for s in section if s.startswith("| conv |"))
    assert f"| 16 → {kept} | 1 → 1 |" in line
    assert f"| 16 → {kept} |" in next(s for s in section if s.startswith("| conv2 |"))
    assert not any(s.startswith("| bn |") for s in section)  # a norm follows its conv
    png = (out / "plots" / "accuracy_vs_bytes.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_stock_encoder_rows_say_what_structured_pruning_does():
    """prune.channels / prune.neurons unfuse PyTorch's encoder layers first; check does too,
    and its rows name the stock modules the steps reshape."""
    import lighten
    from lighten.check import check_model
    from lighten.data import DataSpec, load_data

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 32)
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.enc(self.embed(x.flatten(1, 2))).mean(1))

    model = Tokens().eval()
    rows = {r.name: r.cells["prunable (structured)"] for r in check_model(model, (1, 8, 8))}
    data = load_data(DataSpec(name="synthetic", samples=32, input_shape=[1, 8, 8]))
    pruned, report = lighten.compress(model, {"prune.neurons": {"ratio": 0.5}}, data=data)
    assert pruned.enc.layers[0].linear1.out_features < 64
    assert any("prunable neurons" in n for n in report.notes)  # not "channels"
    assert rows["enc.layers.0.linear1"] == rows["enc.layers.1.linear2"] == "yes"
    assert rows["enc.layers.0.self_attn"] == "yes"  # its q/k/v input columns: the width
