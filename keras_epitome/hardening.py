"""The math of hardening a routing map and refitting an epitome, in NumPy.

One statement, shared by the Keras 2 (:mod:`keras_epitome.harden`,
:mod:`keras_epitome.transform`) and the Keras 3 (:mod:`keras_epitome.keras3`)
APIs; it imports neither TensorFlow nor Keras. The layers hand it NumPy arrays
(their epitome, kernel and routing map) and assign what it returns.

Example:
  >>> from keras_epitome import geometry as geo
  >>> g = geo.EpitomeGeometry((3, 8, 8), (4, 4, 4))
  >>> hard = hardened_routing(
  ...     geo.RoutingMap([4.6, 1.2], [0.4, 2.5], [[0.7], [0.2]]), g)
  >>> [o.tolist() for o in hard]
  [[1.0, 1.0], [0.0, 2.0], [[1.0], [0.0]]]
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from keras_epitome import geometry as geo


def relative_change(new, old) -> float:
  """``|new - old| / |old|`` (Frobenius norms; ``|old|`` at least ``1e-12``).

  Example:
    >>> relative_change(np.array([3.0, 4.0]), np.array([3.0, 0.0]))
    1.3333333333333333
  """
  new = np.asarray(new)
  old = np.asarray(old)
  return float(np.linalg.norm(new - old) / max(float(np.linalg.norm(old)), 1e-12))


def hardened_routing(
  routing: Sequence, geometry: geo.EpitomeGeometry
) -> geo.RoutingMap:
  """Every offset rounded to the nearest integer, channel offsets wrapped and
  spatial offsets clipped (:meth:`~keras_epitome.geometry.RoutingMap.normalized`).
  """
  return geo.RoutingMap(*(np.round(o) for o in routing)).normalized(geometry)


def fit_rounded(
  kernel: np.ndarray,
  routing: Sequence,
  geometry: geo.EpitomeGeometry,
  fill: Optional[np.ndarray] = None,
) -> np.ndarray:
  """The least-squares epitome of ``kernel`` under ``routing`` rounded to integers.

  The weight fit of a conversion (:func:`keras_epitome.geometry.fit_epitome`
  reads integer offsets): entries of the epitome no kernel entry reads keep
  ``fill``.
  """
  rounded = geo.RoutingMap(*(np.round(np.asarray(r)) for r in routing))
  return geo.fit_epitome(kernel, rounded, geometry, fill=fill)


def harden(
  routing: Sequence,
  geometry: geo.EpitomeGeometry,
  epitome: np.ndarray,
  kernel: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, geo.RoutingMap]:
  """The hardened epitome and routing map of one layer.

  Args:
    routing: the layer's (inference) routing map.
    geometry: the layer's geometry.
    epitome: the layer's epitome, as a NumPy array.
    kernel: the layer's current kernel: the epitome is refit by least squares
      to it under the hardened map; ``None`` keeps ``epitome`` as it is.

  Returns:
    ``(epitome, routing)``: the routing map is integer-valued (channel offsets
    in ``[0, C_E)``, spatial offsets in ``[0, S_E - S]``), float64.

  Example:
    >>> g = geo.EpitomeGeometry((4, 4), (2, 4))
    >>> kernel = np.arange(16.0).reshape(4, 4)
    >>> epitome, hard = harden(([0.2, 0.9], [0.0], np.zeros((1, 0))), g,
    ...                        np.zeros((2, 4)), kernel)
    >>> hard.in_offsets.tolist(), epitome.tolist()
    ([0.0, 1.0], [[6.0, 7.0, 8.0, 9.0], [6.0, 7.0, 8.0, 9.0]])
  """
  hard = hardened_routing(routing, geometry)
  if kernel is not None:
    epitome = geo.fit_epitome(kernel, hard, geometry, fill=epitome)
  return epitome, hard


# What a hardened layer's config sets: constant offsets, trained epitome.
FIXED_ROUTING = {"sampler": "fixed", "learner": "param"}


def fixed_config(config) -> dict:
  """A layer config with the ``fixed`` sampler (:data:`FIXED_ROUTING`).

  Example:
    >>> fixed_config({"units": 4, "sampler": "learned", "learner": "feature"})
    {'units': 4, 'sampler': 'fixed', 'learner': 'param'}
  """
  return {**config, **FIXED_ROUTING}


def assign_hardened(layer, epitome, routing, bias=None) -> None:
  """Gives a built epitome ``layer`` a hardened epitome and routing map (and ``bias``)."""
  layer.epitome.assign(epitome)
  if bias is not None:
    layer.bias.assign(bias)
  layer.set_routing_map(routing)
