"""
Directories the virt drivers make for what runs as another user (an LXC
desktop's unprivileged root, libvirt's QEMU user): their modes are set
explicitly, whatever the process's umask (twistd's daemon mode sets 077).
"""

import os


def make_dirs(path, mode=0o711):
    """
    Create C{path} and its missing parents, each with C{mode} whatever the
    process's umask: twistd's daemon mode sets 077, which would hide them
    from a container's root or QEMU's user. Directories that exist keep
    their mode.
    """
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        os.chmod(directory, mode)
