"""snapback: snapshots and backups for QEMU/KVM virtual machine disks."""

__version__ = "0.1.0"
