"""Disk image formats: our own header inspector and the one safe qemu-img runner."""
