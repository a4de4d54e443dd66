"""What the Keras 2 and the Keras 3 epitome layers share, without a framework.

:class:`EpitomeLayerBase` holds the methods of
:class:`keras_epitome.layers.EpitomeMixin` and
:class:`keras_epitome.keras3.layers.EpitomeMixin` that read and write the
layer only through attributes and ``Variable.assign`` (its name, geometry
and routing-map variables), so one statement serves both. This module
imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

from keras_epitome import geometry as geo


class EpitomeLayerBase:
  """The framework-free part of an epitome layer (see the module docstring).

  The layer provides ``name``, ``offset_scale``, ``_geometry`` (set by its
  build) and the variables ``in_offsets``, ``out_offsets``,
  ``spatial_offsets`` and ``moving_offsets`` (``None`` where the layer has
  none).
  """

  def _start_geometry(self, kernel_shape):
    """The geometry and fixed routing of the layer's kernel; sets ``_geometry``.

    Raises:
      ValueError: naming the layer, if the epitome does not fit the kernel.
    """
    desc = self._desc()
    try:
      geometry = geo.layer_geometry(
        kernel_shape, self.compression, self.epitome_shape, self.channel_roll, desc
      )
      routing = geo.fixed_routing(geometry, self.spatial_stride)
    except ValueError as e:
      raise ValueError(f"{desc}: {e}") from None
    self._geometry = geometry
    return geometry, routing

  def _desc(self) -> str:
    return f"{type(self).__name__} '{self.name}'"

  @property
  def epitome_geometry(self) -> geo.EpitomeGeometry:
    """The layer's :class:`~keras_epitome.geometry.EpitomeGeometry` (after build)."""
    if self._geometry is None:
      raise ValueError(f"{self._desc()} is not built yet; call it on an input first")
    return self._geometry

  @property
  def compression_ratio(self) -> float:
    """Achieved ratio: kernel size over epitome plus routing-map size."""
    return self.epitome_geometry.compression_ratio

  def set_routing_map(self, routing: geo.RoutingMap):
    """Assigns a routing map (and the moving map of the ``feature`` learner).

    Args:
      routing: offsets in channels and taps, shaped as :attr:`routing_map`.

    Raises:
      ValueError: if a shape does not match the layer's geometry, or an
        offset is not finite.
    """
    g = self.epitome_geometry
    in_o, out_o, sp_o = geo.routing_arrays(routing, g, self._desc())
    s = self.offset_scale
    self.in_offsets.assign(in_o / s)
    self.out_offsets.assign(out_o / s)
    if self.spatial_offsets is not None:
      self.spatial_offsets.assign(geo.spatial_columns(sp_o, g) / s)
    if self.moving_offsets is not None:
      self.moving_offsets.assign(geo.pack_routing(in_o, out_o, sp_o, g))
