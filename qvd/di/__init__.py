"""
Disk images (DIs) for LXC desktops: a root filesystem tarball.

    qvd-di build --desktop xfce -o /tmp/xfce.tar            # build
    qvd-di build --desktop minimal -o m.tar --register --osf test --version 1

L{qvd.di.recipe} says what goes into an image (pure values and texts);
L{qvd.di.build} builds it in two cached layers (the Debian base made by
mmdebstrap, cached by a hash of its inputs, then the cheap qvd code layer);
L{qvd.di.cli} is the C{qvd-di} command.
"""
