"""
C{qvd-di}: build disk images: rootfs tarballs for LXC, bootable qcow2 for KVM.

    qvd-di build --desktop xfce -o xfce.tar
    qvd-di build --desktop xfce --format qcow2 -o xfce.qcow2   # + .kernel, .initrd
    qvd-di build --desktop minimal --colour '#ff0000' -o test.tar
    qvd-di build --desktop mate -o mate.tar --register --osf desktops --version 1
    qvd-di show-key --desktop xfce          # the base layer's cache key

Every error is one line on stderr and a non-zero exit status (2: the command
line; 1: anything else; C{QVD_DEBUG=1} adds the traceback of an unexpected one).
"""

import os
import sys

import qvd
from qvd._cli import ArgumentParser, unexpected
from qvd.config import Config, ConfigError
from qvd.di import qcow2
from qvd.di.build import BuildError, Progress, build_image, register
from qvd.di.recipe import DESKTOPS, Recipe, RecipeError


def _parser():
    parser = ArgumentParser(prog="qvd-di", description="Build qvd disk images.")
    parser.add_argument("--config", help="node configuration file (default /etc/qvd/node.conf)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a rootfs tarball (LXC) or a qcow2 disk (KVM)")
    build.add_argument("--desktop", choices=DESKTOPS, default="xfce")
    build.add_argument("-o", "--output", required=True,
                       help="the image to write (.tar for LXC, .qcow2 for KVM)")
    build.add_argument("--format", choices=("tar", "qcow2"), default=None,
                       help="tar: LXC rootfs tarball; qcow2: bootable KVM disk with its "
                            "kernel and initramfs written beside it (default: from the "
                            "output's extension)")
    build.add_argument("--colour", "--color", dest="colour",
                       help="root window colour of the minimal desktop")
    build.add_argument("--package", action="append", default=[],
                       help="an extra Debian package (repeatable)")
    build.add_argument("--cache", help="base layer cache directory (di.build.cache)")
    build.add_argument("--source", default=os.path.dirname(os.path.abspath(qvd.__file__)),
                       help="the qvd package directory copied into the image")
    build.add_argument("--quiet", action="store_true", help="hide mmdebstrap's output")
    build.add_argument("--register", action="store_true",
                       help="register the image with 'qvd-admin di add'")
    build.add_argument("--osf", help="OSF of the registered image")
    build.add_argument("--version", help="version of the registered image")
    key = sub.add_parser("show-key", help="print the base layer's cache file name")
    key.add_argument("--desktop", choices=DESKTOPS, default="xfce")
    key.add_argument("--package", action="append", default=[])
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = Config.load(args.config)
        fmt = getattr(args, "format", None)
        if args.command == "build" and fmt is None:
            fmt = "qcow2" if args.output.endswith(".qcow2") else "tar"
        extra = list(args.package) + (list(qcow2.VM_PACKAGES) if fmt == "qcow2" else [])
        recipe = Recipe.from_config(config, args.desktop, getattr(args, "colour", None), extra)
        if args.command == "show-key":
            print(recipe.base_name())
            return 0
        if args.register and not (args.osf and args.version):
            parser.error("--register needs --osf NAME and --version V")
        if not os.path.isfile(os.path.join(args.source, "vma", "__main__.py")):
            parser.error(f"--source {args.source}: not a qvd package directory "
                         "(it has no vma/__main__.py)")
        if os.geteuid() != 0:
            raise BuildError("qvd-di build must run as root (mmdebstrap makes root-owned files)")
        output = os.path.abspath(args.output)
        suffix = ".qcow2" if fmt == "qcow2" else ".tar"
        if not output.endswith(suffix):
            raise BuildError(f"the output {args.output!r} of a {fmt} image must end in {suffix}")
        progress = Progress(sys.stderr)
        progress.phase(f"building {recipe.desktop} image {output}")
        tarball = output if fmt == "tar" else output[:-len(suffix)] + ".rootfs.tar"
        build_image(recipe, tarball, args.source, args.cache or config.get("di.build.cache"),
                    progress, quiet=args.quiet)
        if fmt == "qcow2":
            progress.phase(f"making {tarball} bootable under KVM")
            try:
                image = qcow2.build_from_tarball(tarball, output)
            except qcow2.ImageError as e:
                raise BuildError(str(e))
            finally:
                os.unlink(tarball)
            progress.phase(f"wrote {image.path}, {image.kernel}, {image.initrd}")
        if args.register:
            progress.phase(f"registering as OSF {args.osf}, version {args.version}")
            sys.stdout.write(register(output, args.osf, args.version, args.config))
        progress.phase("done")
        return 0
    except (ConfigError, RecipeError, BuildError) as e:
        sys.stderr.write(f"qvd-di: {e}\n")
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"qvd-di: {where}{e.strerror or e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("qvd-di: interrupted\n")
        return 130
    except Exception as e:
        sys.stderr.write(unexpected("qvd-di", e) + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
