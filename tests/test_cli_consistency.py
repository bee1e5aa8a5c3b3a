"""The command line as a new user meets it: ``--version``; a wrong flag or a missing option is one
line that says what was meant, exit 2; flags and defaults read plainly in ``--help``; a second
cluster's dashboard moves port without distributed's warning; ``synth`` and ``export`` create
the folder they write into; ``crisp train`` runs on ``--cluster``; and ``atomic_write``, the one
way a file is written whole, leaves nothing behind when the write fails (a full disk included)."""

from __future__ import annotations

import errno
import importlib.metadata
import io
import json
import socket
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import typer

from conftest import cli_error, write_raw_mrc
from cryodask.cli import _register, app, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cryodask {importlib.metadata.version('cryodask')}"


@pytest.mark.parametrize("argv, expected", [
    (["membranes", "t.mrc", "--outt", "o"], "cryodask membranes: no such option --outt; did you mean --out?"),
    (["membranes", "t.mrc", "-out", "o"], "no such option -out; did you mean --out?"),  # click sees only "-o"
    (["pick", "t.mrc", "--out", "o", "--treshold", "3"], "did you mean --threshold?"),
    (["--debugg"], "cryodask: no such option --debugg; did you mean --debug?"),
    (["membrane", "t.mrc"], "Did you mean 'membranes'?"),
    (["crisp", "train", "--micrographs", "m", "--out", "o", "--clusterr", "local"], "did you mean --cluster?"),
    (["membranes", "t.mrc"], "cryodask membranes: missing option --out (Output folder"),
    (["membranes"], "cryodask membranes: missing argument INPUTS"),
    (["synth", "tomogram", "--out"], "cryodask synth tomogram: Option '--out' requires an argument"),
    (["synth", "tomogram", "--out", "t.mrc", "--seed", "one"], "Invalid value for '--seed'"),
])
def test_usage_errors_are_one_line_that_says_what_was_meant(capsys, argv, expected):
    assert expected in cli_error(capsys, argv)


def test_a_command_alone_prints_its_help(capsys):
    assert main(["crisp"]) == 0
    assert "train" in capsys.readouterr().out


def _commands():
    _register()

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_help_shows_flags_plainly_and_defaults(capsys, monkeypatch):
    """No ``<bool>`` after a flag (typer prints one unless told); a flag that is off by default
    has no ``--no-`` twin; every option with a default shows it."""
    monkeypatch.setenv("COLUMNS", "250")  # one row per option: nothing wraps
    commands = _commands()
    assert len(commands) > 15
    for path, command in commands:
        assert main([*path, "--help"]) == 0
        text = capsys.readouterr().out
        assert "<bool>" not in text, path
        flat = " ".join(text.replace("│", " ").split())  # rows that wrapped, joined again
        for param in command.params:
            if getattr(param, "hidden", False) or param.param_type_name != "option":
                continue
            if param.is_flag and not param.default:
                assert not param.secondary_opts, (path, param.opts)
            elif param.default == "":  # typer shows no empty default: the help must say it
                assert "default" in param.help, (path, param.opts)
            elif not param.is_flag and param.default not in (None, ()):
                shown = (", ".join(map(str, param.default)) if isinstance(param.default, (list, tuple))
                         else param.default)
                assert f"[default: {shown}]" in flat, (path, param.opts, shown)


def test_dashboard_port_taken_is_told_by_a_listening_socket():
    from cryodask.engine.cluster import dashboard_port_taken

    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert dashboard_port_taken(port)
    assert not dashboard_port_taken(port)


def test_a_second_cluster_moves_its_dashboard_without_a_warning():
    """With the default port taken (here, or by another cluster already), distributed would warn in
    three lines; cryodask asks for a free port, and the command's one ``dashboard:`` line says which."""
    from cryodask.engine.cluster import DASHBOARD_PORT, connect, dashboard_port_taken

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if not dashboard_port_taken():
            holder.bind(("", DASHBOARD_PORT))
            holder.listen()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with connect("local", workers=1, memory_limit="1GB") as client:
                link = client.dashboard_link
    finally:
        holder.close()
    assert f":{DASHBOARD_PORT}/" not in link, link
    assert not [w for w in caught if "already in use" in str(w.message)]


def test_synth_creates_the_folder_it_writes_into(tmp_path):
    out = tmp_path / "new" / "deeper" / "t.mrc"
    assert main(["synth", "tomogram", "--out", str(out), "--shape", "16,32,32"]) == 0
    mic = tmp_path / "other" / "m.mrc"
    assert main(["synth", "micrograph", "--out", str(mic), "--shape", "64,64", "--diameter", "12"]) == 0
    for path in (out, out.parent / "truth" / "t_membranes.mrc", mic):
        assert mrcfile.validate(str(path), print_file=io.StringIO()), path


def test_synth_into_a_folder_that_cannot_be_made_is_one_line(capsys, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    err = cli_error(capsys, ["synth", "tomogram", "--out", str(tmp_path / "a-file" / "t.mrc")])
    assert str(tmp_path / "a-file") in err


def test_export_creates_the_folder_it_writes_into(tmp_path, client):
    from cryodask.convert import ConvertParams, convert
    from cryodask.export import export

    data = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    write_raw_mrc(tmp_path / "t.mrc", data, voxel_size=7.0)
    convert([tmp_path / "t.mrc"], tmp_path / "zarr", ConvertParams(chunks=(8, 16, 16), levels=1), client=client)
    out = export(tmp_path / "zarr" / "t.zarr", tmp_path / "new" / "deeper" / "t.mrc")
    assert mrcfile.validate(str(out), print_file=io.StringIO())
    with mrcfile.open(out) as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        assert mrc.voxel_size.x == pytest.approx(7.0)


def _micrographs(root: Path, n: int = 2) -> tuple[Path, Path]:
    from cryodask.synth import synth_micrograph, write_micrograph

    mics, stars = root / "mics", root / "stars"
    mics.mkdir(parents=True)
    stars.mkdir()
    for seed in range(n):
        paths = write_micrograph(mics / f"m{seed}.mrc", synth_micrograph((128, 128), diameter=24, seed=seed, snr=0.5))
        paths["particles"].rename(stars / paths["particles"].name)
    return mics, stars


def test_crisp_train_reads_the_micrographs_on_the_cluster(tmp_path, client, capsys):
    from cryodask.micrographs.crisp.train import check_labels, load_examples

    mics, stars = _micrographs(tmp_path)
    paths, names, shapes, labels = check_labels([mics], particles=stars, diameter=24.0, quiet=True)
    here = load_examples(paths, names, shapes, labels, 24.0, 2)
    there = load_examples(paths, names, shapes, labels, 24.0, 2, client)
    assert len(there) == len(here) == 2
    for (a, b), (c, d) in zip(here, there):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)

    model = tmp_path / "model"
    code = main(["crisp", "train", "--micrographs", str(mics), "--particles", str(stars), "--diameter", "24",
                 "--bin", "2", "--widths", "4,8", "--epochs", "1", "--crop", "32", "--threads", "1",
                 "--cluster", client.scheduler.address, "--out", str(model)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((model / "config.json").read_text())["micrographs"] == [str(p) for p in paths]
    assert cli_error(capsys, ["crisp", "train", "--micrographs", str(mics), "--particles", str(stars),
                              "--diameter", "24", "--cluster", "nonsense", "--out", str(tmp_path / "m2")]
                     ).startswith("error: --cluster nonsense")
    assert not (tmp_path / "m2").exists()  # refused before anything was made


def test_atomic_write_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from cryodask.io.folders import atomic_write

    target = tmp_path / "picks.csv"
    with atomic_write(target) as partial:
        assert partial.parent == tmp_path and partial != target
        partial.write_text("x,y\n1,2\n")
        assert not target.exists()  # nobody sees it before it is whole
    assert target.read_text() == "x,y\n1,2\n"

    with pytest.raises(RuntimeError), atomic_write(target) as partial:
        partial.write_text("half")
        raise RuntimeError("the writer broke")
    assert target.read_text() == "x,y\n1,2\n" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_write_on_a_full_disk_leaves_neither_partial_nor_half_a_target(tmp_path):
    """A real ENOSPC from the kernel: the partial name points at /dev/full, where every write
    fails with 'No space left on device'."""
    from cryodask.io.folders import atomic_write

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    target = tmp_path / "picks.star"
    target.write_text("the previous, complete file\n")
    (tmp_path / "picks.star.partial").symlink_to("/dev/full")
    with pytest.raises(OSError) as info, atomic_write(target) as partial, open(partial, "w") as f:
        f.write("data_\n" * 100_000)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.star"]
    assert target.read_text() == "the previous, complete file\n"


def test_every_option_of_a_parameter_defaults_to_its_field():
    """Each default lives in one dataclass field: an option named after a field (its flag, as
    ``validate.flag`` spells it) shows that field's default, for every parameter class."""
    from dataclasses import MISSING, fields

    import typer

    from cryodask.cli import _register, app
    from cryodask.io.layouts import ConvertParams
    from cryodask.membranes.params import ClassicalParams, EtsamParams, MembraneParams
    from cryodask.picking.params import CryosamParams, LogParams
    from cryodask.postprocess.params import PostprocessParams
    from cryodask.prompting.params import FeatureParams
    from cryodask.validate import flag

    _register()  # every command's module imported, as main() does
    commands = typer.main.get_command(app).commands
    classes = {"convert": [ConvertParams], "membranes": [ClassicalParams, EtsamParams, MembraneParams],
               "postprocess": [PostprocessParams], "pick": [LogParams, CryosamParams], "features": [FeatureParams]}
    checked = 0
    for command, owners in classes.items():
        options = {opt: p for p in commands[command].params for opt in getattr(p, "opts", [])}
        for cls in owners:
            for f in fields(cls):
                option = options.get(flag(f.name))
                if option is None or f.default is MISSING:
                    continue
                shown = option.default
                if isinstance(shown, str) and not isinstance(f.default, str) and f.default is not None:
                    shown = tuple(int(v) for v in shown.split(",")) if "," in shown else float(shown)
                assert shown == f.default, f"{command} {flag(f.name)} defaults to {shown!r}, {cls.__name__}." \
                                           f"{f.name} to {f.default!r}"
                checked += 1
    assert checked >= 35  # the options of every parameter class were found, not skipped


def test_help_shows_the_defaults_of_the_parameter_classes(capsys):
    from cryodask.membranes.classical import ClassicalParams
    from cryodask.picking.log import LogParams

    assert main(["membranes", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"[default: {ClassicalParams.thickness}]" in text and f"[default: {ClassicalParams.high}]" in text
    assert main(["pick", "--help"]) == 0
    assert f"[default: {LogParams.threshold}]" in " ".join(capsys.readouterr().out.split())
