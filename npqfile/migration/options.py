"""The migration's capabilities and parameters: QEMU's ``migration/options.c``.

Supports :class:`MigrationParams`, the knobs of ``migrate-set-capabilities`` and
``migrate-set-parameters`` the simulator models (bandwidth, downtime limit, the limits
npqfile adds -- ``max_iterations``, ``time_limit``, ``on_limit`` -- zero-page
detection, XBZRLE, page compression, release-ram, pause-before-switchover, multifd,
mapped-ram, auto-converge, postcopy, the QEMU version whose stream is written), and
its ``check()`` (QEMU's ``migrate_params_check`` / ``migrate_caps_check``: the first bad
value or combination, named, as a ValueError before anything is sent).

Goals: QEMU's names and QEMU's refusals; one place that says which combinations are
allowed.  Plan: a dataclass the engine, the session, the CLI and the sweep share; each
mechanism's own rules stay in its module (``multifd.check_params``,
``throttle.check_params``, ``versions``) and are called from ``check()``.  Importable
from ``npqfile.migration.engine`` as well (its historical home).
"""

from __future__ import annotations

from dataclasses import dataclass

from npqfile.migration.throttle import AutoConverge
from npqfile.migration.throttle import check_params as check_throttle_params
from npqfile.stream.versions import stream_version


@dataclass
class MigrationParams:
    """The knobs of ``migrate-set-parameters`` / ``migrate-set-capabilities`` we model.

    Bandwidth in bytes/s (0 = unlimited), times in seconds.  ``on_limit``: what to do when
    ``max_iterations`` or ``time_limit`` is reached without converging: ``cancel`` (QEMU's
    migrate_cancel) or ``force`` (stop-and-copy anyway, with a longer downtime).
    ``release_ram`` is the capability; the engine itself releases nothing (when the
    source may release is ``release_ram.may_release``'s rule, applied by the session)."""
    max_bandwidth: float = 0.0
    downtime_limit: float = 0.3
    max_iterations: int = 30
    time_limit: float = 60.0
    on_limit: str = "cancel"
    zero_page_detection: bool = True
    xbzrle_cache_size: int = 0
    compress_level: int | None = None
    release_ram: bool = False
    pause_before_switchover: bool = False
    machine: str = "none"
    runstate: str = "running"
    sample_rss: bool = False
    multifd_channels: int = 0           # QEMU's multifd capability + multifd-channels (0: off)
    multifd_compression: str = "none"
    multifd_zero_page: str = "multifd"  # zero-page-detection with multifd: multifd | legacy | none
    qemu_version: str = "7.2"       # the QEMU whose stream is written (npqfile.stream.versions)
    mapped_ram: bool = False        # QEMU 9.0+ mapped-ram file layout (a file: destination)
    # auto-converge capability and its migrate-set-parameters (QEMU's names; see throttle)
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50
    cpu_throttle_tailslow: bool = False
    postcopy_after: int | str | None = None    # postcopy: after N dirty syncs, or "auto" (see postcopy.py)

    def check(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        version = stream_version(self.qemu_version)
        if self.compress_level is not None:
            version.check_compress_pages()
        if self.mapped_ram:
            version.check_mapped_ram()
            if self.xbzrle_cache_size or self.compress_level is not None:
                raise ValueError("mapped-ram cannot be combined with XBZRLE or page compression (QEMU refuses both)")
        if self.max_bandwidth < 0:
            raise ValueError(f"max_bandwidth must not be negative ({self.max_bandwidth})")
        if self.downtime_limit < 0:
            raise ValueError(f"downtime_limit must not be negative ({self.downtime_limit})")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1 ({self.max_iterations})")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive ({self.time_limit})")
        if self.on_limit not in ("cancel", "force"):
            raise ValueError(f"on_limit must be cancel or force, not {self.on_limit!r}")
        if self.multifd_channels:
            from npqfile.migration.multifd import check_params
            check_params(self)
        pa = self.postcopy_after
        if pa is not None and pa != "auto" and (not isinstance(pa, int) or pa < 0):
            raise ValueError(f"postcopy_after must be a number of dirty syncs >= 0 or 'auto', not {pa!r}")
        if pa is not None and (self.multifd_channels or self.mapped_ram):
            # QEMU sends postcopy pages on the main channel only; mapped-ram is a file: layout
            raise ValueError("postcopy cannot be combined with multifd channels or mapped-ram here")
        size = self.xbzrle_cache_size
        if size and (size < 4096 or size & (size - 1)):
            raise ValueError(f"xbzrle cache size {size} must be a power of two >= 4096")
        check_throttle_params(self.cpu_throttle_initial, self.cpu_throttle_increment,
                              self.max_cpu_throttle, self.throttle_trigger_threshold)

    def auto_converge_state(self, page_size: int = 4096) -> AutoConverge | None:
        """The auto-converge decision state these parameters describe (None when off)."""
        if not self.auto_converge:
            return None
        return AutoConverge(cpu_throttle_initial=self.cpu_throttle_initial,
                            cpu_throttle_increment=self.cpu_throttle_increment,
                            max_cpu_throttle=self.max_cpu_throttle,
                            throttle_trigger_threshold=self.throttle_trigger_threshold,
                            cpu_throttle_tailslow=self.cpu_throttle_tailslow, page_size=page_size)
