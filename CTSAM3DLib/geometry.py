"""Geometry between a CT in its own grid and the network's 64^3 patches.

The authors resample a whole scan onto an axis-aligned 1.5 mm lattice (identity direction in LPS,
origin at the minimum corner of the scan's world bounding box) and cut 64^3 patches from it.
Here a patch is sampled straight from the source image at the same lattice points, which gives
the same values at a cost independent of the scan's size, and a patch's probability is mapped back
onto the source grid by trilinear interpolation over just the source voxels it covers.

Index order: SimpleITK indices and patch voxel coordinates are (x, y, z); numpy arrays from
SimpleITK and torch volumes are (z, y, x).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .constants import LATTICE_SPACING_MM, OUTSIDE_HU, PATCH_SIZE

PATCH_CENTRE_VOXEL = PATCH_SIZE // 2
"""The patch voxel (32, 32, 32) sits on the lattice voxel a patch is centred on."""

COMPUTE_DTYPES = {"mps": torch.float32}
"""The arithmetic of ``DeviceVolume`` on devices without float64; float64 elsewhere."""


def index_to_world_matrix(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(A, b) with world_lps = A @ index_xyz + b for ``image``."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    return matrix, np.array(image.GetOrigin(), dtype=np.float64)


def world_bounding_box(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum LPS corners of the image's box, over the 8 points whose indices are 0 or
    N along each axis, in float32 arithmetic as in the authors' code (so the lattice matches)."""
    size = image.GetSize()
    matrix, origin = index_to_world_matrix(image)
    corners = np.array(
        [[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], dtype=np.float32
    )
    world = corners @ matrix.astype(np.float32).T + origin.astype(np.float32)
    return world.min(axis=0).astype(np.float64), world.max(axis=0).astype(np.float64)


@dataclass(frozen=True)
class Lattice:
    """The axis-aligned 1.5 mm grid (identity direction, LPS) that patches are cut from."""

    origin_lps: Tuple[float, float, float]
    size: Tuple[int, int, int]
    spacing: float = LATTICE_SPACING_MM

    @classmethod
    def of_image(cls, image: sitk.Image, spacing: float = LATTICE_SPACING_MM) -> Lattice:
        low, high = world_bounding_box(image)
        size = np.round((high - low) / spacing).astype(np.int64)
        return cls(tuple(float(v) for v in low), tuple(int(v) for v in size), spacing)

    def nearest_index(self, point_lps: Sequence[float]) -> np.ndarray:
        """The (x, y, z) lattice voxel nearest to a world point."""
        offset = (np.asarray(point_lps, dtype=np.float64) - np.array(self.origin_lps)) / self.spacing
        return np.floor(offset + 0.5).astype(np.int64)

    def sample(self, image: sitk.Image, patch: PatchGeometry) -> np.ndarray:
        """The patch's Hounsfield units (size^3, float32, (z, y, x)): ``image`` on the lattice,
        -1024 outside the lattice's extent, exactly as the authors' pipeline gives them.

        The authors resample the whole scan onto the lattice in the scan's own pixel type (so
        integer scans are truncated to integers) and crop. ITK evaluates each output row by
        interpolating between the row's two ends, so a value depends on the row's full length:
        resampling full-length rows through just the patch's (y, z) range gives bit-identical
        values at a fraction of the cost, and the patch's columns are then cut from them.
        """
        start = np.array(patch.start_index)
        stop = start + patch.size
        row_start = np.maximum(start, 0)
        row_stop = np.minimum(stop, self.size)
        block = np.full((patch.size,) * 3, OUTSIDE_HU, dtype=np.float32)
        if np.any(row_stop <= row_start):
            return block
        rows_origin = np.array(self.origin_lps) + self.spacing * np.array([0, row_start[1], row_start[2]])
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize([int(self.size[0]), int(row_stop[1] - row_start[1]), int(row_stop[2] - row_start[2])])
        resampler.SetOutputSpacing([self.spacing] * 3)
        resampler.SetOutputOrigin(rows_origin.tolist())
        resampler.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetDefaultPixelValue(OUTSIDE_HU)
        resampler.SetOutputPixelType(image.GetPixelID())
        rows = sitk.GetArrayFromImage(resampler.Execute(image))
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(row_start[::-1], row_stop[::-1], start[::-1]))
        block[inner] = rows[:, :, row_start[0]:row_stop[0]]
        return block

    def sample_mask(self, mask: sitk.Image, patch: PatchGeometry) -> np.ndarray:
        """A 0/1 float mask on the patch (size^3, float32, (z, y, x)), linearly interpolated (fractions at its
        border, as a probability would have), 0 outside the mask's extent."""
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize([patch.size] * 3)
        resampler.SetOutputSpacing([patch.spacing] * 3)
        resampler.SetOutputOrigin(list(patch.origin_lps))
        resampler.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetDefaultPixelValue(0.0)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
        return sitk.GetArrayFromImage(resampler.Execute(mask))

    def patch_centred_on(self, index_xyz: Sequence[int]) -> PatchGeometry:
        start = np.asarray(index_xyz, dtype=np.int64) - PATCH_CENTRE_VOXEL
        origin = np.array(self.origin_lps) + start * self.spacing
        return PatchGeometry(tuple(int(v) for v in start), tuple(float(v) for v in origin), self.spacing)


@dataclass(frozen=True)
class PatchGeometry:
    """A 64^3 block of the lattice: voxel (0,0,0) at ``origin_lps``, identity direction."""

    start_index: Tuple[int, int, int]
    origin_lps: Tuple[float, float, float]
    spacing: float = LATTICE_SPACING_MM
    size: int = PATCH_SIZE

    @property
    def centre_lps(self) -> np.ndarray:
        return np.array(self.origin_lps) + PATCH_CENTRE_VOXEL * self.spacing

    def to_voxel(self, point_lps: Sequence[float]) -> np.ndarray:
        """Continuous (x, y, z) patch voxel coordinates of a world point."""
        return (np.asarray(point_lps, dtype=np.float64) - np.array(self.origin_lps)) / self.spacing

    def to_world(self, voxel_xyz: Sequence[float]) -> np.ndarray:
        """The world point (LPS) of continuous (x, y, z) patch voxel coordinates."""
        return np.array(self.origin_lps) + self.spacing * np.asarray(voxel_xyz, dtype=np.float64)

    def contains(self, point_lps: Sequence[float]) -> bool:
        """Whether the point lies within the patch's voxels (their extent, half a voxel beyond
        the outer voxel centres)."""
        voxel = self.to_voxel(point_lps)
        return bool(np.all(voxel >= -0.5) and np.all(voxel < self.size - 0.5))

    def shifted(self, offset_xyz: Sequence[int]) -> PatchGeometry:
        """The patch displaced by whole patches, e.g. (1, 0, 0) for the neighbour at +x."""
        step = np.asarray(offset_xyz, dtype=np.int64) * self.size
        start = np.array(self.start_index) + step
        origin = np.array(self.origin_lps) + step * self.spacing
        return PatchGeometry(tuple(int(v) for v in start), tuple(float(v) for v in origin), self.spacing, self.size)


@dataclass(frozen=True)
class SourceRegion:
    """A box of source voxels: ``start`` and ``size`` as (x, y, z) indices."""

    start: Tuple[int, int, int]
    size: Tuple[int, int, int]

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        """numpy (z, y, x) slices of the region."""
        return tuple(slice(s, s + n) for s, n in zip(self.start[::-1], self.size[::-1]))

    def union(self, other: SourceRegion) -> SourceRegion:
        low = np.minimum(self.start, other.start)
        high = np.maximum(np.add(self.start, self.size), np.add(other.start, other.size))
        return SourceRegion(tuple(int(v) for v in low), tuple(int(v) for v in high - low))

    def intersection(self, other: SourceRegion) -> Optional[SourceRegion]:
        """The common box, or None when the boxes do not overlap."""
        low = np.maximum(self.start, other.start)
        high = np.minimum(np.add(self.start, self.size), np.add(other.start, other.size))
        if np.any(high <= low):
            return None
        return SourceRegion(tuple(int(v) for v in low), tuple(int(v) for v in high - low))

    def slices_within(self, outer: SourceRegion) -> Tuple[slice, slice, slice]:
        """numpy (z, y, x) slices of this region inside an array covering ``outer``."""
        offset = np.subtract(self.start, outer.start)
        return tuple(slice(o, o + n) for o, n in zip(offset[::-1], self.size[::-1]))


@dataclass(frozen=True)
class SeparableMap:
    """A patch volume's trilinear interpolation onto a source region whose axes each run along one of
    the patch's (any unrotated scan): three small matrix products instead of a gather per voxel.
    ``order`` permutes the volume's axes into those moved by source z, y, x; ``matrices`` are the 1D
    interpolation weights along source z, y, x ((n, S) each); ``distances`` each source voxel's
    distance from the patch centre along that axis, in patch voxels ((n,) each)."""

    order: Tuple[int, int, int]
    matrices: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    distances: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SourceGrid:
    """The source image's grid, and the maps between it and patches."""

    SEPARABLE_MAPS_KEPT = 256
    """How many (region, patch) interpolation maps ``patch_samples`` keeps: a refining click renders the
    region it rendered before, and building the map is most of the host's work there."""

    def __init__(self, image: sitk.Image) -> None:
        self.size = tuple(int(v) for v in image.GetSize())
        self.index_to_world, self.origin_lps = index_to_world_matrix(image)
        self.world_to_index = np.linalg.inv(self.index_to_world)
        self._separable_maps: Dict[tuple, Optional[SeparableMap]] = {}

    def continuous_index(self, point_lps: Sequence[float]) -> np.ndarray:
        return self.world_to_index @ (np.asarray(point_lps, dtype=np.float64) - self.origin_lps)

    def contains(self, point_lps: Sequence[float]) -> bool:
        """Whether a world point lies within the image's voxels."""
        index = self.continuous_index(point_lps)
        return bool(np.all(index >= -0.5) and np.all(index <= np.array(self.size) - 0.5))

    def world_points(self, region: SourceRegion) -> np.ndarray:
        """LPS positions (nz, ny, nx, 3) of the centres of ``region``'s voxels."""
        z, y, x = np.meshgrid(*(np.arange(s, s + n) for s, n in zip(region.start[::-1], region.size[::-1])),
                              indexing="ij")
        return np.stack([x, y, z], axis=-1) @ self.index_to_world.T + self.origin_lps

    def same_grid(self, image: sitk.Image, tolerance_mm: float = 1e-4) -> bool:
        """Whether ``image`` has this grid: its size, and every voxel within ``tolerance_mm`` of the same
        world position (each axis compared over the grid's whole extent)."""
        matrix, origin = index_to_world_matrix(image)
        corner = np.array(self.size, dtype=np.float64)
        return (tuple(int(v) for v in image.GetSize()) == self.size
                and np.allclose(origin, self.origin_lps, atol=tolerance_mm)
                and np.allclose(matrix * corner, self.index_to_world * corner, atol=tolerance_mm))

    def bounds_lps(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) LPS coordinates of the image's voxels (their outer faces), per axis."""
        corners = np.array([[i, j, k] for i in (-0.5, self.size[0] - 0.5) for j in (-0.5, self.size[1] - 0.5)
                            for k in (-0.5, self.size[2] - 0.5)])
        world = corners @ self.index_to_world.T + self.origin_lps
        return world.min(axis=0), world.max(axis=0)

    def region_of(self, patch: PatchGeometry) -> Optional[SourceRegion]:
        """The smallest box of source voxels holding every voxel whose centre lies within the
        patch's extent; None when the patch misses the image."""
        low_voxel, high_voxel = -0.5, patch.size - 0.5
        corners = np.array(
            [[i, j, k] for i in (low_voxel, high_voxel) for j in (low_voxel, high_voxel)
             for k in (low_voxel, high_voxel)]
        )
        world = np.array(patch.origin_lps) + corners * patch.spacing
        indices = np.array([self.continuous_index(point) for point in world])
        start = np.maximum(np.floor(indices.min(axis=0)), 0).astype(np.int64)
        stop = np.minimum(np.ceil(indices.max(axis=0)) + 1, self.size).astype(np.int64)
        if np.any(stop <= start):
            return None
        return SourceRegion(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))

    def patch_coordinates(self, region: SourceRegion, patch: PatchGeometry, device: torch.device) -> torch.Tensor:
        """Continuous (x, y, z) patch voxel coordinates of every voxel of ``region``:
        a tensor (nz, ny, nx, 3) on ``device``."""
        x, y, z = (
            torch.arange(s, s + n, dtype=torch.float32, device=device) for s, n in zip(region.start, region.size)
        )
        return affine_points(x, y, z, self.index_to_world / patch.spacing,
                             (self.origin_lps - np.array(patch.origin_lps)) / patch.spacing)

    def axis_aligned_coordinates(
        self, region: SourceRegion, patch: PatchGeometry, device: torch.device
    ) -> Optional[List[Tuple[int, torch.Tensor]]]:
        """For a grid whose axes are parallel to the patch's (any order and sign: every direction
        of an unrotated scan), per source axis x, y, z: (the patch coordinate component it moves,
        0..2 for x, y, z, and that component's values along the region, a float32 tensor (n,)).
        None for an oblique grid."""
        matrix = self.index_to_world / patch.spacing
        components = moved_components(matrix)
        if components is None:
            return None
        offset = (self.origin_lps - np.array(patch.origin_lps)) / patch.spacing
        axes = []
        for axis, (start, count) in enumerate(zip(region.start, region.size)):
            component = components[axis]
            index = torch.arange(start, start + count, dtype=torch.float64)
            values = index * float(matrix[component, axis]) + float(offset[component])
            axes.append((component, values.to(device=device, dtype=torch.float32)))
        return axes

    def patch_samples(
        self, region: SourceRegion, patch: PatchGeometry, volume: torch.Tensor, footprint_only: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """A patch volume (1,1,S,S,S) sampled at every voxel of ``region``, and each voxel's
        Chebyshev distance from the patch centre in patch voxels: two tensors (nz, ny, nx). With
        ``footprint_only`` the second is instead whether that distance is at most S/2 (bool): the
        patch's own voxels, cheaper to find.

        The same values as ``sample_patch_volume`` at ``patch_coordinates`` (up to float rounding);
        for an axis-aligned grid, trilinear interpolation factors into one 1D interpolation per
        axis, three small matrix products instead of a gather per voxel."""
        size = volume.shape[-1]
        separable = self._separable_map(region, patch, size, volume.device)
        if separable is None:
            centre = (size - 1) / 2
            coordinates = self.patch_coordinates(region, patch, volume.device)
            distance = (coordinates - centre).abs().amax(dim=-1)
            return sample_patch_volume(volume, coordinates), distance <= size / 2 if footprint_only else distance
        ordered = volume.to(torch.float32)[0, 0].permute(separable.order)
        matrix_z, matrix_y, matrix_x = separable.matrices
        a, b, c = ordered.shape
        sampled = torch.mm(matrix_z, ordered.reshape(a, b * c))
        sampled = torch.matmul(matrix_y, sampled.view(-1, b, c))
        sampled = torch.matmul(sampled, matrix_x.t())
        dz, dy, dx = separable.distances
        if footprint_only:
            half = size / 2
            return sampled, (dz <= half)[:, None, None] & (dy <= half)[None, :, None] & (dx <= half)[None, None, :]
        return sampled, torch.maximum(torch.maximum(dz[:, None, None], dy[None, :, None]), dx[None, None, :])

    def _separable_map(self, region: SourceRegion, patch: PatchGeometry, size: int,
                       device: torch.device) -> Optional[SeparableMap]:
        """``SeparableMap`` of a patch volume onto a region (None for an oblique grid), kept for later calls."""
        key = (region, patch, size, str(device))
        if key not in self._separable_maps:
            if len(self._separable_maps) >= self.SEPARABLE_MAPS_KEPT:
                self._separable_maps.clear()
            axes = self.axis_aligned_coordinates(region, patch, device)
            if axes is None:
                self._separable_maps[key] = None
            else:
                (x_component, x_values), (y_component, y_values), (z_component, z_values) = axes
                centre = (size - 1) / 2
                self._separable_maps[key] = SeparableMap(
                    # Patch volume axis 2 - c carries coordinate component c: order the volume's axes as
                    # the components moved by source z, y, x.
                    (2 - z_component, 2 - y_component, 2 - x_component),
                    tuple(linear_interpolation_matrix(values, size) for values in (z_values, y_values, x_values)),
                    tuple((values - centre).abs() for values in (z_values, y_values, x_values)))
        return self._separable_maps[key]

    def assemble(
        self, region: SourceRegion, patches: Iterable[Tuple[PatchGeometry, SourceRegion, torch.Tensor]],
        device: torch.device,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch probabilities ((geometry, covered source region, volume (1,1,S,S,S)) each, in opening
        order) assembled over a source region: the probability (nz, ny, nx) on ``device`` and where a
        patch decided it (bool, same shape; elsewhere the probability is meaningless). Where patches
        overlap, a voxel takes the patch whose centre is nearest (Chebyshev distance in patch voxels;
        the earlier patch on a tie)."""
        shape = tuple(region.size[::-1])
        reaching = [(geometry, common, volume) for geometry, patch_region, volume in patches
                    if (common := patch_region.intersection(region)) is not None]
        if len(reaching) == 1 and reaching[0][1] == region:
            # One patch alone (a click's own patch): no competition to settle, the cheap common case.
            geometry, _, volume = reaching[0]
            return self.patch_samples(region, geometry, volume, footprint_only=True)
        probability = torch.zeros(shape, device=device)
        best = torch.full(shape, float("inf"), device=device)
        for geometry, common, volume in reaching:
            # Only the patch's own footprint: adjacent patches touch a region along a thin slab.
            window = common.slices_within(region)
            sampled, distance = self.patch_samples(common, geometry, volume)
            take = (distance <= volume.shape[-1] / 2) & (distance < best[window])
            probability[window] = torch.where(take, sampled, probability[window])
            best[window] = torch.where(take, distance, best[window])
        return probability, torch.isfinite(best)

    def inside_box(self, region: SourceRegion, box_lps: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Whether each voxel centre of ``region`` lies in an axis-aligned LPS box: bool (nz, ny, nx).

        Each world coordinate is a sum of one term per index axis, built by broadcasting, so an
        unrotated grid costs 1D arrays only."""
        inside = np.ones(region.size[::-1], dtype=bool)
        for axis in range(3):
            coordinate = np.float64(self.origin_lps[axis])
            for index_axis, (start, count) in enumerate(zip(region.start, region.size)):
                step = self.index_to_world[axis, index_axis]
                if step != 0:
                    shape = [1, 1, 1]
                    shape[2 - index_axis] = count
                    coordinate = coordinate + (np.arange(start, start + count) * step).reshape(shape)
            inside &= (coordinate >= box_lps[0][axis]) & (coordinate <= box_lps[1][axis])
        return inside


class DeviceVolume:
    """The CT's voxels held as a tensor on a torch device, and patches sampled from them there.

    The same values as ``Lattice.sample``, bit for bit: SimpleITK's resampling is reproduced step by
    step in float64, on a GPU without leaving it. ITK maps each output row's two ends to continuous
    source indices and places the row's points between them (``start + (end - start) * i / row
    length``), then interpolates linearly along x, y and z in turn, borders extended half a voxel, and
    truncates for an integer scan. Computed any other way the rounding differs in the last bit, which
    on an integer scan whose voxels the lattice points hit exactly (the 1.5 mm aorta CT) truncated
    about 1% of voxels to the integer below: enough to move a cross-patch click on a GPU. Apple MPS has
    no float64: there the indices are still ITK's and the interpolation is float32 (``COMPUTE_DTYPES``).
    ``for_mask`` makes one that samples a 0/1 mask as ``Lattice.sample_mask`` does.
    """

    def __init__(self, image: sitk.Image, lattice: Lattice, device: torch.device, *, outside: float = OUTSIDE_HU,
                 bounded_by_lattice: bool = True, truncates: Optional[bool] = None) -> None:
        values = sitk.GetArrayViewFromImage(image)
        self.truncates = bool(np.issubdtype(values.dtype, np.integer)) if truncates is None else truncates
        self.outside = outside
        self.bounded_by_lattice = bounded_by_lattice
        if values.dtype not in (np.int16, np.uint8, np.float32):
            values = values.astype(np.float32)
        self._image = image  # the voxels' owner: on the CPU the tensor is a read-only view of them
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.voxels = torch.from_numpy(values).to(device)
        self.size = tuple(int(v) for v in image.GetSize())
        self.lattice = lattice
        self.compute_dtype = COMPUTE_DTYPES.get(self.voxels.device.type, torch.float64)
        self._origin = np.array(image.GetOrigin(), dtype=np.float64)
        self._point_to_index = itk_point_to_index_matrix(image)
        self._separable = bool(np.all((self._point_to_index != 0).sum(axis=1) == 1)
                               and np.all((self._point_to_index != 0).sum(axis=0) == 1))
        """Whether each source axis runs along one lattice axis (any unrotated scan): then every index
        component is a 1D function of one output axis, computed on the CPU, and the interpolation goes
        axis by axis over a block of voxels instead of gathering eight voxels per point."""

    @classmethod
    def for_mask(cls, mask: sitk.Image, lattice: Lattice, device: torch.device) -> DeviceVolume:
        """A 0/1 mask (uint8: a quarter of float32's device memory) sampled as ``Lattice.sample_mask``
        samples it: linear fractions at its border, 0 beyond its extent, nothing truncated."""
        return cls(mask, lattice, device, outside=0.0, bounded_by_lattice=False, truncates=False)

    def sample(self, geometries: Sequence[PatchGeometry]) -> torch.Tensor:
        """The patches' values (Hounsfield units for a CT), (N, S, S, S) float32 on the volume's device,
        (z, y, x)."""
        size = geometries[0].size if geometries else PATCH_SIZE
        patches = torch.full((len(geometries),) + (size,) * 3, float(self.outside), device=self.voxels.device)
        for patch, geometry in zip(patches, geometries):
            self._sample_into(patch, geometry)
        return patches

    def _sample_into(self, patch: torch.Tensor, geometry: PatchGeometry) -> None:
        """Writes one patch into ``patch`` (S, S, S), as the resampling of ``Lattice.sample`` (whole
        lattice rows through the patch's rows, then cropped) or of ``Lattice.sample_mask`` (the patch
        alone) makes it; where it has no rows, ``patch`` is left as it is."""
        size = geometry.size
        start = np.array(geometry.start_index)
        if self.bounded_by_lattice:
            low, high = np.maximum(start, 0), np.minimum(start + size, self.lattice.size)
            rows_origin = np.array(self.lattice.origin_lps) + geometry.spacing * np.array([0, low[1], low[2]])
            row_length, first_x = int(self.lattice.size[0]), int(low[0])
        else:
            low, high = start, start + size
            rows_origin, row_length, first_x = np.array(geometry.origin_lps), size, 0
        if np.any(high <= low):
            return
        shape = tuple(int(n) for n in (high - low)[::-1])
        index = self._continuous_indices(rows_origin, geometry.spacing, row_length, first_x, shape)
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(low[::-1], high[::-1], start[::-1]))
        patch[inner] = self._interpolate(index, shape)

    def _continuous_indices(self, rows_origin: np.ndarray, spacing: float, row_length: int, first_x: int,
                            shape: Tuple[int, int, int]) -> List[torch.Tensor]:
        """Source continuous indices x, y, z of the output voxels ``first_x + i`` of rows ``j``, ``k``
        ((k, j, i) < ``shape``) of an output grid at ``rows_origin`` (identity direction), as ITK's
        resampling computes them: three float64 tensors broadcastable to ``shape``, each of size 1 along
        the output axes it does not depend on; on the CPU for a separable grid. Terms with a zero
        coefficient are left out: adding zero changes nothing, so the values are ITK's all the same."""
        device = torch.device("cpu") if self._separable else self.voxels.device
        dtype = torch.float64 if device.type == "cpu" else self.compute_dtype
        steps = [torch.arange(n, dtype=dtype, device=device) for n in shape[::-1]]
        offset_y = (rows_origin[1] + spacing * steps[1] - self._origin[1]).view(1, -1, 1)
        offset_z = (rows_origin[2] + spacing * steps[2] - self._origin[2]).view(-1, 1, 1)
        fractions = ((first_x + steps[0]) / row_length).view(1, 1, -1)

        def at_row_ends(row: np.ndarray, x_index: int) -> torch.Tensor:
            """One index component at output voxel ``x_index`` of every row, (nz|1, ny|1, 1)."""
            value = torch.full((1, 1, 1), float(row[0] * ((rows_origin[0] + spacing * x_index) - self._origin[0])),
                               dtype=dtype, device=device)
            if row[1] != 0:
                value = value + float(row[1]) * offset_y
            if row[2] != 0:
                value = value + float(row[2]) * offset_z
            return value

        components = []
        for row in self._point_to_index:
            start = at_row_ends(row, 0)
            if row[0] == 0:  # both ends of a row give the same index, and start + 0 * fraction is start
                components.append(start)
            else:
                components.append(start + (at_row_ends(row, row_length) - start) * fractions)
        return components

    def _interpolate(self, index: List[torch.Tensor], shape: Tuple[int, int, int]) -> torch.Tensor:
        """ITK's linear interpolation at continuous indices (x, y, z components, broadcastable to
        ``shape``): along x, then y, then z, between a voxel and the next (the voxel alone at or beyond
        the last one); ``outside`` beyond half a voxel past the border; truncated for an integer scan."""
        device = self.voxels.device
        inside = torch.ones(shape, dtype=torch.bool, device=device)
        lower, upper, fraction = [], [], []
        for component, extent in zip(index, self.size):
            inside = inside & ((component >= -0.5) & (component < extent - 0.5)).to(device, non_blocking=True)
            base = component.floor().clamp(0, extent - 1)
            fraction.append((component - base).clamp(min=0).to(device, self.compute_dtype, non_blocking=True))
            lower.append(base.long())
            upper.append((lower[-1] + 1).clamp(max=extent - 1))
        if self._separable:
            value = self._interpolate_separably(lower, upper, fraction)
        else:
            value = self._interpolate_pointwise(lower, upper, fraction)
        if self.truncates:
            value = value.trunc_()
        return value.masked_fill_(~inside, float(self.outside))

    def _interpolate_pointwise(self, lower: List[torch.Tensor], upper: List[torch.Tensor],
                               fraction: List[torch.Tensor]) -> torch.Tensor:
        """Eight voxels gathered for every point (any grid)."""
        flat = self.voxels.reshape(-1)
        width, height = self.size[0], self.size[1]

        def voxel(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return flat[(z * height + y) * width + x].to(self.compute_dtype)

        (x0, y0, z0), (x1, y1, z1), (fx, fy, fz) = lower, upper, fraction
        along_x = [_between(voxel(x0, y, z), voxel(x1, y, z), fx) for z in (z0, z1) for y in (y0, y1)]
        return _between(_between(along_x[0], along_x[1], fy), _between(along_x[2], along_x[3], fy), fz)

    def _interpolate_separably(self, lower: List[torch.Tensor], upper: List[torch.Tensor],
                               fraction: List[torch.Tensor]) -> torch.Tensor:
        """For a separable grid (indices on the CPU): the block of voxels the points reach, interpolated
        along source x, then y, then z, each step over a whole axis at once: per point the operations of
        ``_interpolate_pointwise``, in the same order."""
        first = [int(low.min()) for low in lower]
        last = [int(high.max()) + 1 for high in upper]
        block = self.voxels[tuple(slice(a, b) for a, b in zip(first[::-1], last[::-1]))]
        # Each step gathers along dim 0 (whole rows: fast) and records which output dim it produced.
        values = block.permute(2, 0, 1).contiguous()  # source x, z, y
        runs_along = []
        for axis in range(3):  # source x, y, z
            low, high = ((index.reshape(-1) - first[axis]).to(self.voxels.device, non_blocking=True)
                         for index in (lower[axis], upper[axis]))
            runs_along.append(next(dim for dim in range(3) if self._point_to_index[axis, 2 - dim] != 0))
            values = _between(values.index_select(0, low).to(self.compute_dtype),
                              values.index_select(0, high).to(self.compute_dtype), fraction[axis].reshape(-1, 1, 1))
            # Next: source y to dim 0 (after x: x', z, y -> y, x', z), then source z (y', x', z -> z, y', x').
            values = values.permute(2, 0, 1).contiguous() if axis < 2 else values
        # values now runs along (source z, y, x)'s output dims.
        return values.permute([[runs_along[2], runs_along[1], runs_along[0]].index(dim) for dim in range(3)])


def _between(low: torch.Tensor, high: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Linear interpolation written as ITK writes it (``low + (high - low) * fraction``), for its rounding."""
    return low + (high - low) * fraction


def itk_point_to_index_matrix(image: sitk.Image) -> np.ndarray:
    """The 3x3 matrix ITK maps (point - origin) to continuous indices with, read back from SimpleITK:
    ITK inverts direction x spacing numerically, and only its own numbers reproduce its rounding."""
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    columns = []
    for axis in range(3):
        # A step of a power of two that moves the origin exactly: the map is read back unrounded.
        step = next(step for step in (1.0, -1.0, 0.5, -0.5, 2.0, -2.0) if (origin[axis] + step) - origin[axis] == step)
        point = origin.copy()
        point[axis] += step
        columns.append(np.array(image.TransformPhysicalPointToContinuousIndex(point.tolist())) / step)
    return np.array(columns, dtype=np.float64).T


def affine_points(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, matrix: np.ndarray,
                  offset: np.ndarray) -> torch.Tensor:
    """``matrix @ (x, y, z) + offset`` at every combination of the 1D coordinates ``x``, ``y``, ``z``
    (tensors of one dtype on one device): (nz, ny, nx, 3) of that dtype, built separably (each input
    axis adds one column of the map)."""
    columns = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    return (
        z[:, None, None, None] * columns[:, 2]
        + y[None, :, None, None] * columns[:, 1]
        + x[None, None, :, None] * columns[:, 0]
        + torch.as_tensor(offset, dtype=x.dtype, device=x.device)
    )


def moved_components(matrix: np.ndarray) -> Optional[List[int]]:
    """For a 3x3 linear map whose columns each move exactly one output component (a permutation
    with scaling and signs: the axes are parallel), the component each column moves; None otherwise."""
    moving = np.abs(matrix) > 1e-9 * np.abs(matrix).max()
    if not (np.all(moving.sum(axis=0) == 1) and np.all(moving.sum(axis=1) == 1)):
        return None
    return [int(np.argmax(moving[:, column])) for column in range(3)]


def linear_interpolation_matrix(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) weights of 1D linear interpolation at ``positions`` on voxels 0..size-1, positions
    beyond the outer voxels taking the border value (grid_sample's "border", align_corners=True)."""
    if size == 1:
        return torch.ones(positions.shape[0], 1, dtype=positions.dtype, device=positions.device)
    clamped = positions.clamp(0, size - 1)
    lower = clamped.floor().clamp(max=size - 2).long()
    upper_weight = clamped - lower
    weights = torch.zeros(positions.shape[0], size, dtype=positions.dtype, device=positions.device)
    rows = torch.arange(positions.shape[0], device=positions.device)
    weights[rows, lower] = 1 - upper_weight
    weights[rows, lower + 1] = upper_weight
    return weights


def sample_patch_volume(volume: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a patch volume (1,1,S,S,S) at continuous (x, y, z) voxel coordinates
    (..., 3); coordinates beyond the outer voxel centres take the border value."""
    size = volume.shape[-1]
    grid = coordinates / (size - 1) * 2 - 1
    sampled = F.grid_sample(
        volume.to(torch.float32), grid.reshape(1, -1, 1, 1, 3), mode="bilinear",
        padding_mode="border", align_corners=True,
    )
    return sampled.reshape(coordinates.shape[:-1])
