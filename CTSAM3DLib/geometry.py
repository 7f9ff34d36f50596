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
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .constants import LATTICE_SPACING_MM, OUTSIDE_HU, PATCH_SIZE

PATCH_CENTRE_VOXEL = PATCH_SIZE // 2
"""The patch voxel (32, 32, 32) sits on the lattice voxel a patch is centred on."""


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


class SourceGrid:
    """The source image's grid, and the maps between it and patches."""

    def __init__(self, image: sitk.Image) -> None:
        self.size = tuple(int(v) for v in image.GetSize())
        self.index_to_world, self.origin_lps = index_to_world_matrix(image)
        self.world_to_index = np.linalg.inv(self.index_to_world)

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
        axes = self.axis_aligned_coordinates(region, patch, volume.device)
        size = volume.shape[-1]
        centre = (size - 1) / 2
        if axes is None:
            coordinates = self.patch_coordinates(region, patch, volume.device)
            distance = (coordinates - centre).abs().amax(dim=-1)
            return sample_patch_volume(volume, coordinates), distance <= size / 2 if footprint_only else distance
        (x_component, x_values), (y_component, y_values), (z_component, z_values) = axes
        # Patch volume axis 2 - c carries coordinate component c: order the volume's axes as the
        # components moved by source z, y, x.
        ordered = volume.to(torch.float32)[0, 0].permute(2 - z_component, 2 - y_component, 2 - x_component)
        sampled = interpolate_separably(ordered, z_values, y_values, x_values)
        dz, dy, dx = ((values - centre).abs() for values in (z_values, y_values, x_values))
        if footprint_only:
            half = size / 2
            return sampled, (dz <= half)[:, None, None] & (dy <= half)[None, :, None] & (dx <= half)[None, None, :]
        return sampled, torch.maximum(torch.maximum(dz[:, None, None], dy[None, :, None]), dx[None, None, :])

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

    The same lattice points and interpolation as ``Lattice.sample`` (ITK's linear interpolation: border
    voxels extended half a voxel, -1024 HU beyond the image and the lattice, integer scans truncated),
    computed in float32 with torch instead of float64 in SimpleITK on the CPU: on a GPU this keeps a
    click's work on the GPU. Values agree with ``Lattice.sample`` to rounding: on integer scans whose
    voxels the lattice points hit exactly, either side's rounding may truncate an integer value to the
    next one below, so about 1% of voxels differ by 1 HU there. The float32 network on a CPU keeps
    ``Lattice.sample``, the path the parity tests check. ``for_mask`` makes one that samples a 0/1 mask
    as ``Lattice.sample_mask`` does.
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
        self.grid = SourceGrid(image)
        self.lattice = lattice

    @classmethod
    def for_mask(cls, mask: sitk.Image, lattice: Lattice, device: torch.device) -> DeviceVolume:
        """A 0/1 mask (uint8: a quarter of float32's device memory) sampled as ``Lattice.sample_mask``
        samples it: linear fractions at its border, 0 beyond its extent, nothing truncated."""
        return cls(mask, lattice, device, outside=0.0, bounded_by_lattice=False, truncates=False)

    def sample(self, geometries: Sequence[PatchGeometry]) -> torch.Tensor:
        """The patches' values (Hounsfield units for a CT), (N, S, S, S) float32 on the volume's device,
        (z, y, x)."""
        return torch.stack([self._sample_one(geometry) for geometry in geometries])

    def _sample_one(self, geometry: PatchGeometry) -> torch.Tensor:
        device = self.voxels.device
        size = geometry.size
        region = self.grid.region_of(geometry)
        if region is None:
            return torch.full((size,) * 3, self.outside, device=device)
        block = self.voxels[region.slices].to(torch.float32)
        aligned = self._sample_axis_aligned(geometry, region, block)
        if aligned is not None:
            return aligned
        index = self._source_indices(geometry, device)
        extent = torch.tensor(self.grid.size, dtype=torch.float32, device=device)
        inside = ((index >= -0.5) & (index < extent - 0.5)).all(dim=-1)
        lattice_index = torch.arange(size, device=device)
        start = geometry.start_index
        for axis in range(3 if self.bounded_by_lattice else 0):  # (x, y, z) lattice axes are dims 2, 1, 0
            on_lattice = (lattice_index + start[axis] >= 0) & (lattice_index + start[axis] < self.lattice.size[axis])
            inside &= on_lattice.view([-1 if dim == 2 - axis else 1 for dim in range(3)])
        local = index - torch.tensor(region.start, dtype=torch.float32, device=device)
        span = torch.tensor([max(n - 1, 1) for n in region.size], dtype=torch.float32, device=device)
        sampled = F.grid_sample(
            block[None, None], (local / span * 2 - 1)[None], mode="bilinear", padding_mode="border",
            align_corners=True,
        )[0, 0]
        return self._finish(sampled, inside)

    def _finish(self, sampled: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        if self.truncates:
            sampled = torch.trunc(sampled)
        return torch.where(inside, sampled, torch.full_like(sampled, self.outside))

    def _sample_axis_aligned(self, geometry: PatchGeometry, region: SourceRegion,
                             block: torch.Tensor) -> Optional[torch.Tensor]:
        """The patch by one 1D interpolation per axis when each lattice axis runs along one source
        axis (any unrotated scan); None for an oblique one."""
        matrix = self.grid.world_to_index * geometry.spacing
        sources = moved_components(matrix)
        if sources is None:
            return None
        device = block.device
        offset = self.grid.world_to_index @ (np.array(geometry.origin_lps) - self.grid.origin_lps)
        steps = torch.arange(geometry.size, dtype=torch.float64)
        positions, valid = [], []
        for axis in range(3):  # lattice x, y, z
            source = sources[axis]
            index = steps * float(matrix[source, axis]) + float(offset[source])
            lattice_index = steps + geometry.start_index[axis]
            on_lattice = (lattice_index >= 0) & (lattice_index < self.lattice.size[axis])
            in_image = (index >= -0.5) & (index < self.grid.size[source] - 0.5)
            valid.append((in_image & on_lattice if self.bounded_by_lattice else in_image).to(device))
            positions.append((index - region.start[source]).to(device=device, dtype=torch.float32))
        # Block dim 2 - s carries source axis s: order it as the source axes moved by lattice z, y, x.
        ordered = block.permute(2 - sources[2], 2 - sources[1], 2 - sources[0])
        sampled = interpolate_separably(ordered, positions[2], positions[1], positions[0])
        inside = valid[2][:, None, None] & valid[1][None, :, None] & valid[0][None, None, :]
        return self._finish(sampled, inside)

    def _source_indices(self, geometry: PatchGeometry, device: torch.device) -> torch.Tensor:
        """Continuous (x, y, z) source indices of the patch's lattice points, (S, S, S, 3) in (z, y, x) order."""
        steps = torch.arange(geometry.size, dtype=torch.float32, device=device)
        return affine_points(steps, steps, steps, self.grid.world_to_index * geometry.spacing,
                             self.grid.world_to_index @ (np.array(geometry.origin_lps) - self.grid.origin_lps))


def affine_points(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, matrix: np.ndarray,
                  offset: np.ndarray) -> torch.Tensor:
    """``matrix @ (x, y, z) + offset`` at every combination of the 1D coordinates ``x``, ``y``, ``z``
    (float32 tensors on one device): (nz, ny, nx, 3) float32, built separably (each input axis adds
    one column of the map)."""
    columns = torch.as_tensor(matrix, dtype=torch.float32, device=x.device)
    return (
        z[:, None, None, None] * columns[:, 2]
        + y[None, :, None, None] * columns[:, 1]
        + x[None, None, :, None] * columns[:, 0]
        + torch.as_tensor(offset, dtype=torch.float32, device=x.device)
    )


def moved_components(matrix: np.ndarray) -> Optional[List[int]]:
    """For a 3x3 linear map whose columns each move exactly one output component (a permutation
    with scaling and signs: the axes are parallel), the component each column moves; None otherwise."""
    moving = np.abs(matrix) > 1e-9 * np.abs(matrix).max()
    if not (np.all(moving.sum(axis=0) == 1) and np.all(moving.sum(axis=1) == 1)):
        return None
    return [int(np.argmax(moving[:, column])) for column in range(3)]


def interpolate_separably(volume: torch.Tensor, z_positions: torch.Tensor, y_positions: torch.Tensor,
                          x_positions: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a volume (a, b, c) at every combination of positions along its three
    axes (continuous voxel indices; border values beyond the outer voxels): (nz, ny, nx). Three
    small matrix products instead of a gather per sample."""
    a, b, c = volume.shape
    sampled = torch.mm(linear_interpolation_matrix(z_positions, a), volume.reshape(a, b * c))
    sampled = torch.matmul(linear_interpolation_matrix(y_positions, b), sampled.view(-1, b, c))
    return torch.matmul(sampled, linear_interpolation_matrix(x_positions, c).t())


def linear_interpolation_matrix(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) weights of 1D linear interpolation at ``positions`` on voxels 0..size-1, positions
    beyond the outer voxels taking the border value (grid_sample's "border", align_corners=True)."""
    if size == 1:
        return torch.ones(positions.shape[0], 1, dtype=torch.float32, device=positions.device)
    clamped = positions.clamp(0, size - 1)
    lower = clamped.floor().clamp(max=size - 2).long()
    upper_weight = clamped - lower
    weights = torch.zeros(positions.shape[0], size, dtype=torch.float32, device=positions.device)
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
