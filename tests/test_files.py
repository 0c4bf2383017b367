"""bdm.files, atomic writes: what a writer killed outright (as Ray kills a worker) leaves, and its removal."""

import subprocess
import sys

from bdm.files import remove_temporaries

KILLED_WRITER = """
import os, sys
from bdm.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half an image")
    os._exit(0)  # no unwinding: the temporary stays, as under SIGKILL
"""


def test_a_killed_writer_leaves_a_temporary_that_remove_temporaries_takes_away(tmp_path):
    target = tmp_path / "a.png"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], check=True)
    (tmp_path / "ab.png").write_bytes(b"another image")
    (tmp_path / ".b.png.x1y2.part").write_bytes(b"another writer's temporary")
    leftovers = sorted(p.name for p in tmp_path.glob(".a.png.*.part"))
    assert len(leftovers) == 2 and not target.exists()
    remove_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.png.x1y2.part", "ab.png"]
