"""The MultiBasisConv check script (python -m bdm.plugins.check_multibasis_conv) on this machine's backends: a row
per golden layer and mode and per random form, every error within the spec bound."""

import re

from bdm.plugins import check_multibasis_conv


def test_check_script_prints_every_row_within_the_bound(kernels_library, reference_dir, capsys):
    assert check_multibasis_conv.main(["--reference", str(reference_dir), "--library", str(kernels_library)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("golden", "random"))]
    assert len(rows) == len(check_multibasis_conv.LAYER_CASES) * 3 + len(check_multibasis_conv.FORMS) * 6
    errors = [float(t) for r in rows for t in r if re.fullmatch(r"\d\.\d\de-\d\d", t)]
    assert len(errors) >= len(rows) and max(errors) <= 1e-5 and min(errors) > 0
    assert all(r[-1] != "NO" for r in rows)  # with a GPU: the kernels equal the host path bit for bit
