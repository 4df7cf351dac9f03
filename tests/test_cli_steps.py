"""The step scripts' command lines: --config (repeatable, merged), --print_config (round trip), help text with the
default of every option, one flag style, bad values exit non-zero with a clear message; the component configs load."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEP_SCRIPTS = ["localize", "repair_sweep", "evaluate_fl", "analyze_misclf", "run_experiment", "adequacy_rq1"]


def script(name):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parser_of(name):
    if name.startswith("adequacy_rq"):
        return script("_adequacy_cli").build_parser()
    return script(name).build_parser()


def option_blocks(help_text: str) -> dict[str, str]:
    """--option -> its help block (the lines up to the next option)."""
    body = help_text.split("options:", 1)[1]
    blocks, current = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (--[a-z0-9_.]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current:
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("name", STEP_SCRIPTS)
def test_help_has_text_and_default_for_every_option_and_one_flag_style(name):
    text = parser_of(name).format_help()
    blocks = option_blocks(text)
    assert "--config" in blocks and "--print_config" in blocks
    for opt, block in blocks.items():
        assert "-" not in opt[2:], f"{name}: {opt} is not underscore style"
        if opt in ("--help", "--print_config", "--config"):
            continue
        desc = re.sub(r"^\s*--\S+( [A-Z_]+(\s*\[[A-Z_]+ \.\.\.\])?|\s*\[ITEM,\.\.\.\]| \{true,false\})*", "", block)
        assert len(desc.split("(")[0].strip()) > 3, f"{name}: {opt} has no help text: {block!r}"
        assert "default:" in block, f"{name}: {opt} shows no default: {block!r}"


COMPONENTS = {
    "localize": [["configs/fl/default.yaml"], ["configs/fl/default.yaml", "configs/fl/published.yaml"]],
    "repair_sweep": [["configs/repair/de.yaml"], ["configs/repair/de.yaml", "configs/repair/de_published.yaml"],
                     ["configs/repair/finetune.yaml"], ["configs/repair/prune.yaml"]],
    "evaluate_fl": [["configs/evaluation/default.yaml"]],
    "analyze_misclf": [["configs/misclf/default.yaml"], ["configs/misclf/default.yaml", "configs/misclf/published.yaml"]],
    "adequacy_rq1": [["configs/adequacy/quick.yaml"], ["configs/adequacy/vit_digits.yaml"]],
}


@pytest.mark.parametrize("name, files", [(n, f) for n, fs in COMPONENTS.items() for f in fs],
                         ids=[f"{n}:{'+'.join(Path(x).stem for x in f)}" for n, fs in COMPONENTS.items() for f in fs])
def test_component_configs_merge_and_print_config_round_trips(name, files, tmp_path):
    p = parser_of(name)
    argv = [a for f in files for a in ("--config", str(REPO / f))]
    ns = p.parse_args(argv)
    d = ns.as_dict()
    # the later file wins key by key; keys it does not set keep the earlier file's values
    merged = {}
    for f in files:
        merged = _merge(merged, yaml.safe_load((REPO / f).read_text()))
    _assert_within(merged, d, name)
    printed = tmp_path / "printed.yaml"
    printed.write_text(p.dump(ns, skip_none=False))
    again = p.parse_args(["--config", str(printed)]).as_dict()
    drop = ("config", "__default_config__")
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in d.items() if k not in drop}


def _merge(a, b):
    out = dict(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and name_is_group(k) \
            else v
    return out


def name_is_group(key):  # groups merge key by key; dict-valued options (e.g. repair_options) are replaced whole
    return key in {"data", "model", "attribution", "idc", "rq1", "rq2", "rq3", "rq4", "rq5"}


def _assert_within(raw, parsed, where):
    if isinstance(raw, dict):
        for k, v in raw.items():
            assert k in parsed, f"{where}.{k} dropped"
            _assert_within(v, parsed[k], f"{where}.{k}")
    else:
        assert raw == parsed, where


def test_flags_override_configs():
    p = parser_of("repair_sweep")
    ns = p.parse_args(["--config", str(REPO / "configs/repair/de.yaml"), "--reps", "2", "--budgets", "7", "avg"])
    assert ns.reps == 2 and ns.budgets == [7, "avg"] and ns.repair_options["generations"] == 50
    p = parser_of("adequacy_rq1")
    ns = p.parse_args(["--config", str(REPO / "configs/adequacy/quick.yaml"), "--idc.round_centroids", "2"])
    assert ns.idc.round_centroids == 2 and ns.model.max_epochs == 15 and ns.idc.m == 6  # quick, flag, default


BAD = [
    ("localize", ["--methods", "nope"], "unknown FL method 'nope'"),
    ("localize", ["--budgets", "0"], "budget 0"),
    ("localize", ["--method_options", "{ours: {q: 1}}"], "no option(s) ['q']"),
    ("repair_sweep", ["--repair", "nope"], "unknown repair method 'nope'"),
    ("repair_sweep", ["--budgets", "0"], "budget 0"),
    ("repair_sweep", ["--methods", "nope"], "unknown FL method 'nope'"),
    ("repair_sweep", ["--repair_options", "{generationz: 3}"], "no option(s) ['generationz']"),
    ("repair_sweep", ["--shard", "4/4"], "0 <= k < n"),
    ("repair_sweep", ["--reps", "0"], "--reps must be >= 1"),
    ("evaluate_fl", ["--parts", "nope"], "--parts: unknown ['nope']"),
    ("evaluate_fl", ["--methods", "nope"], "unknown FL method 'nope'"),
    ("evaluate_fl", ["--budgets", "0"], "budget 0"),
    ("analyze_misclf", ["--tie_order", "sideways"], "--tie_order"),
    ("analyze_misclf", ["--kinds", "src_tgt", "nope"], "--kinds"),
    ("localize", ["--nope", "1"], "nope"),
]


@pytest.mark.parametrize("name, argv, message", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_bad_values_exit_non_zero_with_a_clear_message(name, argv, message, capsys, tmp_path):
    mod = script(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--run_dir" if name != "repair_sweep" else "--run_dirs", str(tmp_path / "nowhere"), *argv])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err + str(e.value.code)
    assert message in err, err[-1500:]


def test_adequacy_rejects_unknown_keys(capsys):
    mod = script("_adequacy_cli")
    with pytest.raises(SystemExit) as e:
        mod.main("rq1", "doc\n\nmore", ["--idc.nope", "1"])
    assert e.value.code not in (0, None) and "idc.nope" in capsys.readouterr().err


def test_trainer_configs_hold_no_experiment_settings():
    for f in (REPO / "configs" / "trainer").glob("*.yaml"):
        t = yaml.safe_load(f.read_text())["trainer"]
        assert "default_root_dir" not in t, f.name
    assert "max_epochs" not in yaml.safe_load((REPO / "configs/trainer/gpu_ddp.yaml").read_text())["trainer"]
    assert yaml.safe_load((REPO / "configs/recipe/vit_b16_published.yaml").read_text())["trainer"]["max_epochs"] == 2
