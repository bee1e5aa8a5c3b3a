"""The click-to-cluster dock widget: open a tomogram or collection, connect to a cluster, click
particles, find all like them, segment membranes, export. The work is a :class:`Session`'s; this
file only draws it. A timer on the viewer's thread polls the session's jobs every 100 ms and puts
each result in its layer, so nothing here waits on the cluster.

Layers (all in the tomogram's Å, over its image): ``positive clicks`` / ``negative clicks``
(points: adding or removing one segments the object again), ``instance`` (the object, in its
box), ``accepted``, ``detections`` (points with a ``score`` feature; the similarity slider sets
which are shown), ``membrane scores`` and ``membranes`` (the scores above the threshold slider).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGridLayout, QHBoxLayout, QLabel, QLineEdit,
                            QProgressBar, QPushButton, QSlider, QVBoxLayout, QWidget)

from .session import Cancelled, Session

STEPS = 1000  # slider positions


def _limits(session) -> tuple[float, float]:
    """The image's contrast: the 0.5 and 99.5 percentiles of a strided sample (16 slices, every 4th pixel)."""
    volume = session.volume
    sample = np.asarray(volume.to_dask()[:: max(1, volume.shape[0] // 16)][:, ::4, ::4], np.float32)
    return tuple(float(v) for v in np.percentile(sample, (0.5, 99.5)))


class Slider(QWidget):
    """A float slider over ``[low, high]`` with its value shown; ``changed(value)`` on every move."""

    def __init__(self, changed, low=0.0, high=1.0, value=0.0):
        super().__init__()
        self.slider, self.label = QSlider(Qt.Horizontal), QLabel()
        self.slider.setRange(0, STEPS)
        self.changed = changed
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.slider)
        layout.addWidget(self.label)
        self.set_range(low, high, value)
        self.slider.valueChanged.connect(lambda _: self._moved())

    def set_range(self, low: float, high: float, value: float) -> None:
        self.low, self.high = float(low), float(max(high, low + 1e-6))
        self.slider.blockSignals(True)
        self.slider.setValue(round((min(max(value, self.low), self.high) - self.low) / (self.high - self.low) * STEPS))
        self.slider.blockSignals(False)
        self._value = float(value)
        self.label.setText(f"{self._value:.3g}")

    @property
    def value(self) -> float:
        return self._value

    def set_value(self, value: float) -> None:
        """Move to ``value`` exactly (not the nearest step) and apply it once."""
        self.slider.blockSignals(True)
        self.slider.setValue(round((value - self.low) / (self.high - self.low) * STEPS))
        self.slider.blockSignals(False)
        self._value = float(value)
        self.label.setText(f"{self._value:.3g}")
        self.changed(self._value)

    def _moved(self) -> None:
        self._value = self.low + self.slider.value() / STEPS * (self.high - self.low)
        self.label.setText(f"{self._value:.3g}")
        self.changed(self._value)


class ClickWidget(QWidget):
    """npe2 widget: cryodask's prompt-based picking and membranes on a cluster, from napari."""

    def __init__(self, napari_viewer, session: Session | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session or Session()
        self.messages: list[str] = []  # every line shown, for the tests and the log
        self.pending: list = []  # (job, what to do with its result)
        self.image = None
        self._clicks = None  # the clicks last sent to the cluster
        self._lost_said = self._quiet = False
        self._build()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.poll)
        self.timer.start(100)

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.inputs = QLineEdit(placeholderText="tomogram (MRC, OME-Zarr), folder, glob, STAR or copick config")
        self.tomograms = QComboBox()
        self.cluster = QLineEdit("local")
        self.profile = QLineEdit(placeholderText="jobqueue profile: deploy/slurm/cluster.yaml:gpu")
        self.weights = QLineEdit(placeholderText="weights folder (empty: classical, no weights)")
        self.out = QLineEdit(placeholderText="output folder")
        self.diameter = QDoubleSpinBox(minimum=1.0, maximum=10000.0, value=self.session.diameter, suffix=" Å")
        form = QFormLayout()
        for label, field in (("Open", self.inputs), ("Tomogram", self.tomograms), ("Cluster", self.cluster),
                             ("Profile", self.profile), ("Weights", self.weights), ("Output", self.out),
                             ("Diameter", self.diameter)):
            form.addRow(label, field)
        buttons = QGridLayout()
        self.buttons = {}
        for i, (name, slot) in enumerate((("Open", self.open), ("Connect", self.connect),
                                          ("Accept", self.accept), ("Find all", lambda: self.find_all(False)),
                                          ("Find in collection", lambda: self.find_all(True)),
                                          ("Membranes", self.membranes), ("Export", self.export),
                                          ("Cancel", self.cancel))):
            button = QPushButton(name)
            button.clicked.connect(lambda _=False, slot=slot: self._say_errors(slot))
            buttons.addWidget(button, i // 2, i % 2)
            self.buttons[name] = button
        self.similarity = Slider(self._filter, -1.0, 1.0, 0.0)
        self.threshold = Slider(self._threshold, 0.0, 1.0, 0.5)
        form2 = QFormLayout()
        form2.addRow("Similarity ≥", self.similarity)
        form2.addRow("Membrane score >", self.threshold)
        self.progress, self.status = QProgressBar(), QLabel("open a tomogram, connect, click")
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        for part in (form, buttons, form2):
            layout.addLayout(part)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()
        self.tomograms.currentIndexChanged.connect(lambda i: self._say_errors(self.show, i) if i >= 0 else None)
        self.diameter.valueChanged.connect(lambda v: setattr(self.session, "diameter", float(v)))

    def say(self, line: str, error: bool = False) -> None:
        """One line in the status and the viewer's notifications."""
        from napari.utils.notifications import show_error, show_info

        self.messages.append(line)
        self.status.setText(line)
        (show_error if error else show_info)(line)

    def _say_errors(self, fn, *args):
        from ..errors import CryodaskError

        try:
            return fn(*args)
        except (CryodaskError, OSError) as exc:
            self.say(str(exc), error=True)

    # ------------------------------------------------------------------ opening and connecting

    def open(self, inputs=None) -> None:
        """Open the tomogram or collection named (or typed), showing its first tomogram. The files
        are read in a job (the header, the polarity's and the contrast's samples), not here."""
        if inputs is not None:
            self.inputs.setText(str(inputs))
        text = self.inputs.text().strip()

        def opened(limits):
            self.tomograms.blockSignals(True)
            self.tomograms.clear()
            self.tomograms.addItems([item.name for item in self.session.items])
            self.tomograms.blockSignals(False)
            self._draw(limits)

        self.run(self.session.background("open", lambda job: (self.session.open(text), _limits(self.session))[1]),
                 opened)

    def show(self, index: int) -> None:
        """Show another tomogram of the collection (read in a job)."""
        self.run(self.session.background("open", lambda job: (self.session.show(index), _limits(self.session))[1]),
                 self._draw)

    def _draw(self, limits) -> None:
        volume = self.session.volume
        for layer in [layer for layer in self.viewer.layers if layer.metadata.get("cryodask_widget")]:
            self.viewer.layers.remove(layer)
        self.scale, self.translate = tuple(volume.voxel_size), tuple(volume.translation)
        placed = {"scale": self.scale, "translate": self.translate, "metadata": {"cryodask_widget": True}}
        self.image = self.viewer.add_image(volume.to_dask(), name=self.session.item.name, contrast_limits=limits,
                                           **placed)
        self.positive = self.viewer.add_points(ndim=3, name="positive clicks", face_color="lime", size=6, **placed)
        self.negative = self.viewer.add_points(ndim=3, name="negative clicks", face_color="red", size=6, **placed)
        for layer in (self.positive, self.negative):
            layer.metadata = {"cryodask_widget": True}
            layer.events.data.connect(lambda _event: self._clicked())
        self.viewer.layers.selection.active = self.positive
        self.positive.mode = "add"
        self._clicks = None
        self.say(f"opened {volume.path}: {volume.shape[0]}×{volume.shape[1]}×{volume.shape[2]} voxels of "
                 f"{volume.voxel_size[2]:g} Å, {self.session.polarity.polarity} density")

    def connect(self) -> None:
        """Connect to the cluster typed (``local``, an address, or a batch system with its profile),
        and load CryoSAM's models when a weights folder is given."""
        spec, profile = self.cluster.text().strip() or "local", self.profile.text().strip() or None
        weights = self.weights.text().strip()
        if weights:
            from ..picking.params import pick_params
            from ..picking.pipeline import SAM2_FILES

            # the largest SAM2 the folder holds (SAM2_FILES runs tiny to large)
            present = [c for c, f in SAM2_FILES.items() if (Path(weights) / f).is_file()]
            self.session.params = pick_params("cryosam", weights=weights, diameter=self.session.diameter,
                                              config=present[-1] if present else "sam2.1_hiera_l")
        self.session.out = Path(self.out.text().strip()) if self.out.text().strip() else self.session.out
        self.session.connect(spec, config=profile)
        self._lost_said = False
        self.say(f"connected to {self.session.client.scheduler.address} ({self.session.method})")

    # ------------------------------------------------------------------ the work

    def run(self, job, done) -> None:
        """Follow ``job``; ``done(result)`` runs on the viewer's thread when it finishes."""
        self.pending.append((job, done))
        self.poll()

    def _clicked(self) -> None:
        if self._quiet:
            return
        clicks = tuple(tuple(map(tuple, np.round(layer.data, 3))) for layer in (self.positive, self.negative))
        if clicks == self._clicks:
            return
        self._clicks = clicks
        self._say_errors(lambda: self.run(self.session.segment(self.positive.data, self.negative.data),
                                          self._show_instance))

    def _show_instance(self, instance) -> None:
        self._remove("instance")
        if instance is None or not np.asarray(instance[1]).any():
            if instance is not None:
                self.say(f"nothing segmented at the click ({self.pending_seconds:.1f} s): try the particle's centre, "
                         f"or another diameter")
            return
        box, mask = instance[0], np.asarray(instance[1])
        self.viewer.add_labels(mask.astype(np.uint8), name="instance", scale=self.scale, opacity=0.6,
                               translate=tuple(t + b.start * s for t, b, s in zip(self.translate, box, self.scale)),
                               metadata={"cryodask_widget": True})
        self._keep_clicking()
        self.say(f"instance: {int(mask.sum())} voxels in {self.pending_seconds:.1f} s")

    def _keep_clicking(self) -> None:
        """The clicks stay on top and selected, in add mode: a new layer must not take the next click."""
        for layer in (self.negative, self.positive):
            self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        self.viewer.layers.selection.active = self.positive
        self.positive.mode = "add"

    def accept(self) -> None:
        n = self.session.accept()
        self._remove("instance")
        self._remove("accepted")
        self._quiet = True  # emptying the clicks is not a click
        for layer in (self.positive, self.negative):
            layer.data = np.zeros((0, 3))
        self._quiet = False
        self._clicks = None
        if n:
            from ..prompting.instances import lazy_instance_labels

            volume = self.session.volume
            labels = lazy_instance_labels(self.session.accepted, volume.shape, volume.chunks,
                                          scores=np.arange(n, 0, -1, dtype=float))  # ids in the order accepted
            self.viewer.add_labels(labels, name="accepted", scale=self.scale, translate=self.translate, opacity=0.5,
                                   metadata={"cryodask_widget": True})
            self._keep_clicking()
        self.say(f"{n} accepted")

    def find_all(self, collection: bool = False) -> None:
        self._set_out()
        self.run(self.session.find_all(collection, floor=self.similarity.low if self.session.params is None else None),
                 self._show_detections)

    def _show_detections(self, found) -> None:
        self._remove("detections")
        scores = found["score"].to_numpy(np.float64)
        self.detections = self.viewer.add_points(
            found[["z", "y", "x"]].to_numpy(np.float64), name="detections", features={"score": scores},
            size=self.session.diameter / self.scale[2], face_color="transparent",
            border_color="cyan", scale=self.scale, translate=self.translate, metadata={"cryodask_widget": True})
        self._keep_clicking()
        if len(scores):
            start = 0.0 if self.session.params is None else self.session.params.sim_threshold
            self.similarity.set_range(min(scores.min(), start), max(scores.max(), start), start)
        self._filter(self.similarity.value)
        done = self.pending_partial
        where = f"; collection: {', '.join(f'{n} {k}' for n, k in done)}" if len(done) > 1 else ""
        self.say(f"find all: {len(found)} detections in {self.pending_seconds:.1f} s{where}")

    def _filter(self, value: float) -> None:
        """Show the detections scoring ``value`` or more: no recompute."""
        layer = self._layer("detections")
        if layer is not None and len(layer.data):
            layer.shown = layer.features["score"].to_numpy() >= value

    def membranes(self) -> None:
        self._set_out()
        self.run(self.session.membranes(self.weights.text().strip() or None), self._show_membranes)

    def _show_membranes(self, result) -> None:
        import dask.array as da
        import mrcfile

        self._remove("membrane scores")
        self._remove("membranes")
        scores = mrcfile.mmap(result["logits"], mode="r").data  # kept open: the layers read it lazily
        sample = np.asarray(scores[:: max(1, scores.shape[0] // 16)], np.float32)
        self.scores = da.from_array(scores, chunks=self.session.volume.chunks)
        low, high = (float(v) for v in np.percentile(sample, (1, 99.9)))
        placed = {"scale": self.scale, "translate": self.translate, "metadata": {"cryodask_widget": True}}
        self.viewer.add_image(self.scores, name="membrane scores", visible=False, colormap="magma", **placed)
        self.viewer.add_labels(self.scores > result["threshold"], name="membranes", opacity=0.5, **placed)
        self._keep_clicking()
        self.threshold.set_range(min(low, result["threshold"]), max(high, result["threshold"]), result["threshold"])
        self.say(f"membranes ({result['method']}) in {self.pending_seconds:.1f} s; threshold {result['threshold']:.3g}")

    def _threshold(self, value: float) -> None:
        """The membranes at another threshold over the stored scores: no recompute."""
        layer = self._layer("membranes")
        if layer is not None:
            layer.data = self.scores > np.float32(value)

    def export(self) -> None:
        self._set_out()
        self.run(self.session.export(self.similarity.value if len(self.session.detections) else None),
                 lambda files: self.say(f"exported {len(files)} files to {self.session.out}"))

    def cancel(self) -> None:
        n = self.session.cancel()
        self.say(f"cancelled {n} job{'s' if n != 1 else ''}" if n else "nothing to cancel")

    def _set_out(self) -> None:
        if self.out.text().strip():
            self.session.out = Path(self.out.text().strip())

    # ------------------------------------------------------------------ polling

    def poll(self) -> None:
        """Hand finished jobs' results to their layers; show progress; say a lost scheduler once."""
        lost = self.session.lost()
        if lost and not self._lost_said:
            self._lost_said = True
            self.session.cancel()
            self.say(lost, error=True)
        still = []
        for job, done in self.pending:
            if not job.future.done():
                still.append((job, done))
                continue
            self.pending_seconds, self.pending_partial = job.seconds, list(job.partial)
            error = job.future.exception()
            if error is None:
                self._say_errors(done, job.future.result())
            elif isinstance(error, Cancelled):
                if job.name != "instance":  # a newer click replaced it: nothing to say
                    self.say(str(error))
            elif not (lost and str(error) == lost):
                self.say(f"{job.name}: {error}", error=True)
        self.pending = still
        if still:
            job = still[-1][0]
            self.progress.setRange(0, job.total or 0)
            if job.total:
                self.progress.setValue(job.done)
            self.status.setText(f"{job.name}: {job.seconds:.1f} s" + (f", {job.done} of {job.total}"
                                                                         if job.total > 1 else ""))
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)

    def busy(self) -> bool:
        return bool(self.pending)

    def _layer(self, name):
        return next((layer for layer in self.viewer.layers if layer.name == name), None)

    def _remove(self, name) -> None:
        layer = self._layer(name)
        if layer is not None:
            self.viewer.layers.remove(layer)

    def closeEvent(self, event) -> None:  # noqa: N802  (Qt's name)
        self.timer.stop()
        self.session.close()
        super().closeEvent(event)
