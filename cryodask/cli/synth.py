"""``cryodask synth tomogram|micrograph``: write synthetic data with its ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError
from ..io.folders import check_output_dir
from . import app

synth_app = typer.Typer(help="Synthetic tomograms and micrographs with ground truth.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")


def _shape(text: str, names: str) -> tuple[int, ...]:
    parts = text.split(",")
    try:
        if len(parts) != len(names.split(",")):
            raise ValueError
        return tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"--shape {text!r}: expected {len(names.split(','))} comma-separated integers "
                         f"({names})") from None


def _report(paths: dict) -> None:
    for kind, path in paths.items():
        typer.echo(f"wrote {kind}: {path}")


@synth_app.command("tomogram")
def tomogram(
    out: Path = typer.Option(..., "--out", help="Tomogram MRC; its truth goes to truth/X_membranes.mrc and "
                                                "truth/X_particles.star beside it."),
    shape: str = typer.Option("64,128,128", "--shape", help="Z,Y,X in voxels."),
    voxel_size: float = typer.Option(10.0, "--voxel-size", help="Å per voxel."),
    seed: int = typer.Option(0, "--seed"),
    snr: float = typer.Option(0.5, "--snr", help="var(signal) / var(noise)."),
    missing_wedge: float = typer.Option(60.0, "--missing-wedge", help="Missing tilt range in degrees (0: none)."),
    defocus: float = typer.Option(3.0, "--defocus", help="µm (0: no CTF oscillation)."),
    model: str = typer.Option("simple", "--model", help="simple (filtered density) | projection (tilt series with CTF "
                                                        "and shot noise, reconstructed by WBP)."),
    polarity: str = typer.Option("dark", "--polarity",
                                 help="dark (dense matter dark, as most tomograms) | bright (inverted)."),
    tilt_max: float = typer.Option(60.0, "--tilt-max",
                                   help="projection: tilts from -X to +X degrees (replaces --missing-wedge)."),
    tilt_step: float = typer.Option(3.0, "--tilt-step", help="projection: degrees between tilts."),
    dose: float = typer.Option(None, "--dose", help="projection: e-/Å² per tilt; Poisson shot noise instead of --snr "
                                                    "(default: none, --snr sets the noise)."),
    gold: int = typer.Option(0, "--gold", help="projection: gold beads (not in the truth)."),
    filaments: int = typer.Option(0, "--filaments", help="projection: filaments (not in the truth)."),
    ice_gradient: float = typer.Option(0.0, "--ice-gradient",
                                       help="projection: relative change of ice thickness across x."),
    density_map: Path = typer.Option(None, "--map", help="projection: density map MRC of the large particle kind "
                                                         "(default: EMD-3197, shipped in cryodask/synth/maps)."),
):
    """A tomogram of vesicles, a membrane sheet and two particle kinds, with the truth."""
    from ..synth import synth_projection_tomogram, synth_tomogram, write_tomogram

    check_output_dir(out.parent)
    if model not in ("simple", "projection"):
        raise InputError(f"--model {model!r}: expected simple or projection")
    if polarity not in ("dark", "bright"):
        raise InputError(f"--polarity {polarity!r}: expected dark or bright")
    if model == "projection":
        synth = synth_projection_tomogram(_shape(shape, "Z,Y,X"), voxel_size=voxel_size, seed=seed, snr=snr,
                                          dose=dose, tilt_max=tilt_max, tilt_step=tilt_step, defocus=defocus,
                                          n_filaments=filaments, n_gold=gold, ice_gradient=ice_gradient,
                                          polarity=polarity, map_path=density_map)
    else:
        synth = synth_tomogram(_shape(shape, "Z,Y,X"), voxel_size=voxel_size, seed=seed, snr=snr,
                               missing_wedge=missing_wedge, defocus=defocus)
        if polarity == "bright":
            synth.volume = -synth.volume
    typer.echo(f"model {model}, polarity {polarity}")
    _report(write_tomogram(out, synth))


@synth_app.command("micrograph")
def micrograph(
    out: Path = typer.Option(..., "--out", help="Micrograph MRC; its truth goes to truth/X_mask.mrc, "
                                                "truth/X_contaminants.mrc, truth/X_particles.star."),
    shape: str = typer.Option("512,512", "--shape", help="Y,X in pixels."),
    pixel_size: float = typer.Option(1.77, "--pixel-size", help="Å per pixel."),
    diameter: float = typer.Option(108.0, "--diameter", help="Particle diameter in pixels."),
    seed: int = typer.Option(0, "--seed"),
    snr: float = typer.Option(0.3, "--snr", help="var(signal) / var(noise)."),
    defocus: float = typer.Option(1.5, "--defocus", help="µm (0: no CTF oscillation)."),
):
    """A micrograph of particles among ice and carbon contaminants, with the truth."""
    from ..synth import synth_micrograph, write_micrograph

    check_output_dir(out.parent)
    synth = synth_micrograph(_shape(shape, "Y,X"), pixel_size=pixel_size, diameter=diameter, seed=seed, snr=snr,
                             defocus=defocus)
    _report(write_micrograph(out, synth))
