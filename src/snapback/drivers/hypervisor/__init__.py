"""Hypervisor drivers: libvirt domains for instances."""
