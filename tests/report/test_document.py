import base64
import html.parser
import re
import shutil
import struct
import subprocess

import pytest

from instune.report.document import Code, Image, Table, Text, write_report
from instune.report.figures import learning_curves_png
from instune.report.format import format_cell, markdown_table


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


class ImageCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))


@pytest.fixture
def report(tmp_path):
    curve = learning_curves_png([{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 6)])
    image_file = tmp_path / "data_figure.png"
    image_file.write_bytes(curve)
    sections = [
        Text("First paragraph.\n\nSecond <paragraph> & more.", title="summary"),
        Table(["set", "exact match", "loss"], [["arith", 0.5, 1.23456], ["units", float("nan"), None]],
              title="results", caption="a caption"),
        Image(curve, title="curves", caption="learning curves"),
        Image(image_file, title="from a file"),
        Code("name: demo\ntrain:\n  lr: 0.001\n", title="config"),
    ]
    paths = write_report(tmp_path / "out", "demo <report>", sections)
    return paths, curve


def test_format_cell_and_markdown_table():
    assert [format_cell(v) for v in [0.123456, 3, None, float("nan"), "a|b"]] == ["0.1235", "3", "-", "-", "a|b"]
    table = markdown_table(["name", "value"], [["a|b", 1.0], ["c", None]])
    assert table.splitlines() == ["| name | value |", "|---|---:|", "| a\\|b | 1 |", "| c | - |"]


def test_html_is_self_contained_with_decodable_images(report):
    paths, curve = report
    text = paths.html.read_text()
    parser = ImageCollector()
    parser.feed(text)
    assert len(parser.images) == 2
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(img["src"].split(",", 1)[1])
        assert data == curve and png_size(data)[0] > 100
    assert "src=\"http" not in text and "file://" not in text
    assert parser.tags.count("table") == 1 and parser.tags.count("tr") == 3 and parser.tags.count("pre") == 1
    # Text is escaped, not interpreted as markup.
    assert "Second &lt;paragraph&gt; &amp; more." in text and "<title>demo &lt;report&gt;</title>" in text
    assert "<td class=\"num\">1.235</td>" in text and "<td class=\"num\">-</td>" in text


def test_markdown_summary_links_images_written_beside_it(report):
    paths, curve = report
    md = paths.markdown.read_text()
    assert md.startswith("# demo <report>\n")
    assert "## results" in md and "| arith | 0.5 | 1.235 |" in md and "*a caption*" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["report_images/figure_01.png", "report_images/figure_02.png"]
    assert all((paths.markdown.parent / link).read_bytes() == curve for link in links)
    assert "```\nname: demo" in md


def test_images_must_be_png_or_jpeg(tmp_path):
    with pytest.raises(ValueError, match="PNG or JPEG"):
        write_report(tmp_path, "bad", [Image(b"GIF89a....")])


RENDER_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const check = document.createElement("div");
  check.id = "render-check";
  check.textContent = "images=" + images.length + " loaded=" +
    images.filter(i => i.complete && i.naturalWidth > 0).length +
    " widths=" + images.map(i => i.naturalWidth).join(",");
  document.body.appendChild(check);
});
</script>
"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install -y chromium); the HTML structure is checked above")
def test_report_renders_with_its_images_in_headless_chromium(report, tmp_path):
    paths, curve = report
    # A copy with a probe that reports, after load, how many images decoded and their pixel widths.
    probed = tmp_path / "probed.html"
    probed.write_text(paths.html.read_text().replace("</body>", RENDER_CHECK + "</body>"))
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=180)
    match = re.search(r'<div id="render-check">([^<]*)</div>', out.stdout)
    assert match, f"no render check in chromium's DOM; stderr tail: {out.stderr[-500:]}"
    width = png_size(curve)[0]
    assert match.group(1) == f"images=2 loaded=2 widths={width},{width}"
