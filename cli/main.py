"""The `bdm` command line. Every command lives in a module beside this one; this file only wires them
and turns failures into one line on stderr with a non-zero exit."""

import os
import sys

import typer

from bdm.errors import BdmError

app = typer.Typer(
    name="bdm",
    help="Deploy binarized diffusion super-resolution models: export to ONNX, build TensorRT engines, upscale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register():
    from bdm.cli import engine_cmds, export_cmds, generate_cmds, upscale_cmds

    for module in (export_cmds, engine_cmds, upscale_cmds, generate_cmds):
        module.register(app)


_register()


def main(argv=None):
    """Console entry point: BdmError -> `bdm: error: ...` and exit 2; nothing else escapes as a traceback."""
    try:
        app(args=argv, prog_name="bdm")
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bdm: interrupted; no partial output was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("BDM_DEBUG"):
            raise
        print(f"bdm: internal error: {type(e).__name__}: {e} (rerun with BDM_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
