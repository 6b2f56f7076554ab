"""``dlconv explain --html``: the page's script against dlconv.explain, in a real browser.

Debian's Chromium, headless, driven by selenium through the system chromedriver
(``apt-get install chromium chromium-driver``, done by .ci/run).  For each of the issue's
geometries the test writes the page with the CLI, clicks an output, an input and a weight,
and checks that the equation and the offset / im2col / thread / tile table the page shows are
what ``dlconv.explain`` returns; a screenshot of each is checked not blank.  Then the page's
functions are evaluated for generated geometries and compared with the Python maps record by
record.  The launch-constant table of dlconv.locate is checked against the kernel sources
here too (no browser needed).
"""

import ast
import json
import os
import pathlib
import random
import re
import shutil
import struct
import zlib

import pytest

from dlconv import cli, locate
from dlconv.explain import explain as explain_fn, group_channels
from dlconv.shapes import ConvGeometry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
HAS_GROUPS = "groups" in ConvGeometry.FIELDS
#: .ci/run sets this after installing Chromium: there a missing browser fails instead of skipping.
REQUIRED = os.environ.get("DLCONV_REQUIRE_BROWSER") == "1"


# ----------------------------------------------------------------------------- constants
def _py_constants(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _cpp_constants(*paths):
    out = {}
    for path in paths:
        for name, value in re.findall(r"constexpr\s+(?:int|int64_t|i64)\s+(\w+)\s*=\s*([^;]+);",
                                      path.read_text(encoding="utf-8")):
            value = re.sub(r"(?:int64_t|i64)\((\d+)\)", r"\1", value).strip()
            if re.fullmatch(r"[\d\s<()*/+-]+", value):
                out[name] = eval(value)  # noqa: S307 - integer arithmetic from our own headers
    return out


def test_launch_constants_are_the_kernels():
    numba = _py_constants(ROOT / "kernels" / "conv2d_cuda.py")
    cuda = _cpp_constants(ROOT / "csrc" / "cuda_conv.cu", ROOT / "csrc" / "cuda_common.cuh")
    cpu = _cpp_constants(ROOT / "csrc" / "cpu_conv_direct.h")
    for table, source in (("numba_cuda", numba), ("cpp_cuda", cuda), ("cpp_cpu", cpu)):
        for name, value in locate.KERNEL_CONSTANTS[table].items():
            assert source.get(name) == value, f"{table}.{name}: dlconv.locate has {value}, the kernel {source.get(name)}"
    src = (ROOT / "csrc" / "cpu_conv_direct.h").read_text(encoding="utf-8")
    assert "constexpr int max_rows(int nv) { return nv >= 4 ? 6 : nv == 3 ? 8 : 12; }" in src
    assert [locate._max_rows(nv) for nv in (1, 2, 3, 4)] == [12, 12, 8, 6]


def test_locate_matches_the_kernels_index_maps():
    """v1's flat index and v3's tile arithmetic give back the output they name."""
    g = explain_fn((9, 11, 3), 3, filters=70, padding=1).geometry
    for oh, ow, k in ((0, 0, 0), (4, 7, 33), (8, 10, 69)):
        t = locate.cuda_threads(g, 0, oh, ow, k)
        K = locate.KERNEL_CONSTANTS["numba_cuda"]
        idx = t["numba"]["v1"]["block"][0] * K["V1_THREADS"] + t["numba"]["v1"]["thread"][0]
        assert (idx // g.filters, idx % g.filters) == (oh * g.out_w + ow, k)
        v3 = t["cpp"]["v3"]
        C = locate.KERNEL_CONSTANTS["cpp_cuda"]
        ty, tx = divmod(v3["thread"][0], C["V3_BN"] // C["V3_TN"])
        m = v3["block"][0] * C["V3_BM"] + ty * C["V3_TM"] + v3["register"][0]
        n = v3["block"][1] * C["V3_BN"] + tx * C["V3_TN"] + v3["register"][1]
        assert (m, n) == (oh * g.out_w + ow, k)
        cpu = locate.cpu_tile(g, 0, oh, ow, k)
        assert cpu["panel_filters"][0] + cpu["zmm"] * 16 + cpu["lane"] == k
        assert cpu["tile_pixels"][0] + cpu["register_row"] == ow
        assert cpu["tile_shape"][0] <= locate._max_rows(cpu["tile_shape"][1])


def test_html_page_is_self_contained(tmp_path):
    out = tmp_path / "p.html"
    assert cli.main(["explain", "--input", "4x4", "--padding", "1", "--filters", "2", "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "<script src" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    assert '"V3_BM": 64' in text and "function forward(g, f, oh, ow)" in text
    assert '"padding": "explicit"' in text and '"pads": [1, 1, 1, 1]' in text


# ----------------------------------------------------------------------------- browser
#: The issue's geometries: (id, explain kwargs, clicks).  Clicks are 0-based:
#: ("output", f, oh, ow), ("input", c, ih, iw), ("weight", f, c, kh, kw).
CASES = [
    ("workshop-4x4-pad1-2filters", dict(input="4x4", kernel=3, padding=1, filters=2),
     [("output", 1, 0, 0), ("input", 0, 0, 0), ("weight", 0, 0, 1, 1)]),
    ("stride2-unread-column", dict(input="7x6", kernel=3, stride=2),
     [("output", 0, 2, 1), ("input", 0, 0, 5), ("weight", 0, 0, 2, 2)]),
    ("dilation2", dict(input="7x7", kernel=3, dilation=2, padding=1),
     [("output", 0, 0, 0), ("input", 0, 2, 2), ("weight", 0, 0, 0, 2)]),
    ("same-odd-total", dict(input="6x6x2", kernel=3, stride=2, padding="same", filters=2),
     [("output", 1, 2, 2), ("input", 1, 5, 5), ("weight", 1, 1, 2, 0)]),
    ("groups2", dict(input="5x5x4", kernel=3, padding=1, filters=4, groups=2),
     [("output", 3, 1, 1), ("input", 2, 0, 4), ("weight", 2, 3, 1, 1)]),
    # transposed with a = (i + 2p − k) mod s = (6 + 0 − 3) mod 2 = 1: the input clicks are
    # the transposed convolution's sums (backward-data)
    ("transposed-a1", dict(input="6x6", kernel=3, stride=2),
     [("input", 0, 5, 5), ("input", 0, 2, 3), ("output", 0, 1, 1)]),
]


def _cli_args(kw):
    args = ["explain", "--input", kw["input"], "--kernel", str(kw["kernel"])]
    for key in ("filters", "stride", "padding", "dilation", "groups"):
        if key in kw:
            args += [f"--{key}", str(kw[key])]
    return args


def _python_view(kw, click):
    """What dlconv.explain --json says for one click: (equation text, location record)."""
    kind = click[0]
    if kind == "output":
        _, f, oh, ow = click
        e = explain_fn(**kw, at=(oh + 1, ow + 1), filter=f + 1, json_output=True)
        d = json.loads(e.to_json())
        return d["equations"][0]["text"], d["locations"][0]
    if kind == "input":
        _, c, ih, iw = click
        e = explain_fn(**kw, at=(ih + 1, iw + 1), transposed=True, json_output=True)
        d = json.loads(e.to_json())
        return d["reverse"][c]["text"], d["locations"][c]
    _, f, c, kh, kw_ = click
    e = explain_fn(**kw, filter=f + 1, weight=(kh + 1, kw_ + 1, c + 1), json_output=True)
    d = json.loads(e.to_json())
    return d["weight_grads"][0]["text"], d["locations"][0]


def _shown(driver):
    """The equation and the offset tables the page displays."""
    from selenium.webdriver.common.by import By
    head = {tr.get_attribute("data-key"): tr.find_element(By.TAG_NAME, "td").text
            for tr in driver.find_elements(By.CSS_SELECTOR, "#details-head tr")}
    terms = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "#details-terms tr[data-label]"):
        terms[tr.get_attribute("data-label")] = {td.get_attribute("data-key"): td.text
                                                 for td in tr.find_elements(By.CSS_SELECTOR, "td[data-key]")}
    return driver.find_element(By.ID, "equation").text, head, terms


def _expected_head(loc):
    head = {"name": loc["name"]}
    if loc["kind"] == "output":
        head["y_offset"] = str(loc["y_offset"])
        head["im2col_row"] = str(loc["im2col_row"])
        for kset in ("numba", "cpp"):
            for v in ("v1", "v2", "v3"):
                t = loc["cuda"][kset][v]
                head[f"cuda.{kset}.{v}"] = (f"block ({t['block'][0]}, {t['block'][1]}), thread "
                                            f"({t['thread'][0]}, {t['thread'][1]})"
                                            + (f", acc[{t['register'][0]}][{t['register'][1]}]" if t["register"] else "")
                                            + (f" ({t['note']})" if t["note"] else ""))
        p = loc["cpu"]
        head["cpu"] = (f"row item {p['row_item']}, panel {p['panel']} (filters {p['panel_filters'][0]}.."
                       f"{p['panel_filters'][1] - 1}), pixel tile {p['tile']} (columns {p['tile_pixels'][0] + 1}.."
                       f"{p['tile_pixels'][1]}, {p['tile_shape'][0]}×{p['tile_shape'][1]} zmm), register row "
                       f"{p['register_row']}, zmm {p['zmm']}, lane {p['lane']}" + (f" ({p['note']})" if p["note"] else ""))
    else:
        key = "x_offset" if loc["kind"] == "input" else "w_offset"
        head[key] = str(loc[key])
    return head


def _not_blank(png: bytes) -> bool:
    """A PNG screenshot with real content: decode its pixels (zlib, no imaging library) and
    ask for many distinct byte values and a good share of non-white ones."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            width = struct.unpack(">I", png[pos + 8:pos + 12])[0]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return width > 0 and len(set(raw)) > 32 and sum(b < 200 for b in raw[::7]) > len(raw[::7]) // 200


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM and CHROMEDRIVER):
        msg = ("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver): "
               f"chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}")
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        msg = "selenium is not installed (pip install selenium; it is in dlconv's test extra)"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_script_timeout(60)
    yield d
    d.quit()


@pytest.mark.parametrize("name,kw,clicks", CASES, ids=[c[0] for c in CASES])
def test_page_shows_what_explain_computes(driver, tmp_path, name, kw, clicks):
    from selenium.webdriver.common.by import By
    if "groups" in kw and not HAS_GROUPS:
        pytest.skip("this dlconv.shapes has no grouped convolution (ConvGeometry.groups arrives with issue 11)")
    page = tmp_path / f"{name}.html"
    assert cli.main(_cli_args(kw) + ["--html", str(page)]) == 0
    driver.get(page.as_uri())
    assert driver.find_element(By.ID, "error").text == ""
    for click in clicks:
        if click[0] == "weight":        # the weight grid shows (filter, channel) as picked
            driver.execute_script("document.getElementById('filter-pick').value = arguments[0];"
                                  "document.getElementById('filter-pick').dispatchEvent(new Event('change'));"
                                  "document.getElementById('channel-pick').value = arguments[1];"
                                  "document.getElementById('channel-pick').dispatchEvent(new Event('change'));",
                                  click[1], click[2])
        elif click[0] == "output":
            driver.execute_script("document.getElementById('filter-pick').value = arguments[0];"
                                  "document.getElementById('filter-pick').dispatchEvent(new Event('change'));",
                                  click[1])
        elif click[0] == "input":
            driver.execute_script("document.getElementById('channel-pick').value = arguments[0];"
                                  "document.getElementById('channel-pick').dispatchEvent(new Event('change'));",
                                  click[1])
        at = ",".join(map(str, click[1:]))
        driver.find_element(By.CSS_SELECTOR, f'#grids td[data-kind="{click[0]}"][data-at="{at}"]').click()
        text, loc = _python_view(kw, click)
        shown_text, head, terms = _shown(driver)
        assert shown_text == text, (name, click)
        assert head == _expected_head(loc), (name, click)
        want = {t["label"]: {k: str(v) for k, v in t.items() if k != "label"} for t in loc["terms"]}
        assert terms == want, (name, click)
        hot = driver.find_elements(By.CSS_SELECTOR, "#grids td.hot")
        assert hot, (name, click)
    # the relationships the page lists are explain's (text and which one is this case)
    e = explain_fn(**kw)
    for ax in e.arithmetic:
        for r in ax["relations"]:
            li = driver.find_element(By.CSS_SELECTOR, f'#arithmetic li[data-axis="{ax["axis"]}"][data-name="{r["name"]}"]')
            assert li.text.endswith(r["text"]) and ("this" in (li.get_attribute("class") or "")) == r["this"]
        li = driver.find_element(By.CSS_SELECTOR, f'#arithmetic li.transposed[data-axis="{ax["axis"]}"]')
        assert li.text == ax["transposed"]["text"]
    png = driver.get_screenshot_as_png()
    (tmp_path / f"{name}.png").write_bytes(png)
    assert _not_blank(png), name


def _random_configs(n, seed=16):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        groups = rng.choice([1, 1, 2, 3]) if HAS_GROUPS else 1
        c = groups * rng.randint(1, 2)
        cfg = {"h": rng.randint(1, 9), "w": rng.randint(1, 9), "c": c, "kh": rng.randint(1, 4),
               "kw": rng.randint(1, 4), "filters": groups * rng.randint(1, 3), "sh": rng.randint(1, 3),
               "sw": rng.randint(1, 3), "padding": rng.choice(["valid", "same", "explicit"]),
               "pads": [rng.randint(0, 3) for _ in range(4)], "dh": rng.randint(1, 3), "dw": rng.randint(1, 3),
               "groups": groups}
        pad = cfg["padding"] if cfg["padding"] != "explicit" else tuple(cfg["pads"])
        kw = dict(input=(cfg["h"], cfg["w"], cfg["c"]), kernel=(cfg["kh"], cfg["kw"]), filters=cfg["filters"],
                  stride=(cfg["sh"], cfg["sw"]), padding=pad, dilation=(cfg["dh"], cfg["dw"]))
        if groups > 1:
            kw["groups"] = groups
        try:
            e = explain_fn(**kw)
        except ValueError:
            continue
        out.append((cfg, kw, e.geometry))
    return out


def test_page_maps_equal_the_python_maps(driver, tmp_path):
    """The page's forward / reverse / weight-gradient maps, offsets, threads, tiles and
    relationships equal dlconv.explain's for generated geometries (stride, asymmetric and
    'same' padding, dilation, groups, ragged tiles)."""
    page = tmp_path / "maps.html"
    assert cli.main(["explain", "--html", str(page)]) == 0
    driver.get(page.as_uri())
    rng = random.Random(11)
    jobs, want = [], []
    for cfg, kw, g in _random_configs(60):
        f, oh, ow = rng.randrange(g.filters), rng.randrange(g.out_h), rng.randrange(g.out_w)
        c, ih, iw = rng.randrange(g.in_c), rng.randrange(g.in_h), rng.randrange(g.in_w)
        mine = group_channels(g, f)
        wc, kh, kw_ = rng.choice(list(mine)), rng.randrange(g.k_h), rng.randrange(g.k_w)
        for choice, click in (({"kind": "output", "f": f, "oh": oh, "ow": ow}, ("output", f, oh, ow)),
                              ({"kind": "input", "c": c, "ih": ih, "iw": iw}, ("input", c, ih, iw)),
                              ({"kind": "weight", "f": f, "c": wc, "kh": kh, "kw": kw_}, ("weight", f, wc, kh, kw_))):
            jobs.append([cfg, choice])
            want.append((kw, click))
    got = driver.execute_script("return arguments[0].map(j => window.dlconv.explainAt(j[0], j[1]));", jobs)
    for (kw, click), js in zip(want, got):
        e = json.loads(explain_fn(**kw).to_json())
        assert js["arithmetic"] == e["arithmetic"], kw
        gd = e["geometry"]
        assert {k: js["geometry"][k] for k in gd if k != "batch"} == {k: v for k, v in gd.items() if k != "batch"}, kw
        text, loc = _python_view(kw, click)
        key = {"output": "equation", "input": "reverse", "weight": "weight"}[click[0]]
        assert js[key]["text"] == text, (kw, click)
        assert js["location"] == loc, (kw, click)
        if click[0] == "output":
            d = json.loads(explain_fn(**kw, at=(click[2] + 1, click[3] + 1), filter=click[1] + 1).to_json())
            assert js["equation"] == d["equations"][0], (kw, click)


def test_generated_code_gives_the_shapes_it_states(driver, tmp_path):
    """The page's PyTorch and Keras code, run (Keras on its torch backend, in a process of its
    own), build layers whose output shapes are the ones the page states: dlconv.shapes'."""
    import subprocess
    import sys
    page = tmp_path / "code.html"
    assert cli.main(["explain", "--html", str(page)]) == 0
    driver.get(page.as_uri())
    from dlconv.explain_html import initial_config
    cases = [kw for _, kw, _ in CASES if HAS_GROUPS or "groups" not in kw]
    cases.append(dict(input="7x6x2", kernel=3, padding=(0, 2, 1, 0), filters=3))    # explicit asymmetric
    script, expected = [], []
    for lang, want in (("torch", lambda g: f"({g.batch}, {g.filters}, {g.out_h}, {g.out_w})"),
                       ("keras", lambda g: f"(None, {g.out_h}, {g.out_w}, {g.filters})")):
        for kw in cases:
            e = explain_fn(**kw)
            cfg = initial_config(e.geometry, e.padding)
            code = driver.execute_script(f"return window.dlconv.{lang}Code(window.dlconv.geometry(arguments[0]));", cfg)
            assert want(e.geometry) in code          # the shape the page states
            script.append(code)
            expected.append(want(e.geometry))
    # one process for both (Keras' torch backend imports torch anyway)
    out = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True,
                         env=dict(os.environ, KERAS_BACKEND="torch"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-len(expected) - 1:-1] == expected, out.stdout


def test_controls_recompute_and_the_step_control_slides(driver, tmp_path):
    """Typing a new geometry into the controls recomputes the page (explicit asymmetric
    padding, dilation, stride); the slider and play/pause move the window output by output."""
    import time
    from selenium.webdriver.common.by import By
    page = tmp_path / "controls.html"
    assert cli.main(["explain", "--html", str(page)]) == 0
    driver.get(page.as_uri())
    values = {"in-h": 7, "in-w": 6, "in-c": 2, "k-h": 2, "k-w": 3, "filters": 3, "s-h": 2, "s-w": 1,
              "padding": "explicit", "p-t": 0, "p-b": 1, "p-l": 2, "p-r": 0, "d-h": 2, "d-w": 1}
    driver.execute_script("for (const [id, v] of Object.entries(arguments[0])) document.getElementById(id).value = v;"
                          "document.getElementById('in-h').dispatchEvent(new Event('change'));", values)
    assert driver.find_element(By.ID, "error").text == ""
    kw = dict(input=(7, 6, 2), kernel=(2, 3), filters=3, stride=(2, 1), padding=(0, 1, 2, 0), dilation=(2, 1))
    g = explain_fn(**kw).geometry
    driver.execute_script("const p = document.getElementById('filter-pick'); p.value = 2;"
                          "p.dispatchEvent(new Event('change'));")
    driver.find_element(By.CSS_SELECTOR, f'#grids td[data-kind="output"][data-at="2,{g.out_h - 1},0"]').click()
    text, loc = _python_view(kw, ("output", 2, g.out_h - 1, 0))
    shown_text, head, _ = _shown(driver)
    assert shown_text == text and head == _expected_head(loc)
    # the slider selects output i of the filter; play advances it, pause stops it
    driver.execute_script("const s = document.getElementById('step'); s.value = 4; s.dispatchEvent(new Event('input'));")
    assert _shown(driver)[0] == explain_fn(**kw, at=(4 // g.out_w + 1, 4 % g.out_w + 1), filter=3).equations[0].text
    driver.find_element(By.ID, "play").click()
    time.sleep(1.8)                                          # PLAY_MS = 700: two steps
    driver.find_element(By.ID, "play").click()
    step = int(driver.find_element(By.ID, "step").get_attribute("value"))
    assert step in (5, 6, 7)
    assert _shown(driver)[0] == explain_fn(**kw, at=(step // g.out_w + 1, step % g.out_w + 1), filter=3).equations[0].text
    # an impossible geometry is named, not drawn
    driver.execute_script("const e = document.getElementById('k-h'); e.value = 9; e.dispatchEvent(new Event('change'));")
    assert "larger than the padded input" in driver.find_element(By.ID, "error").text
