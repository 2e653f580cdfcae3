"""Who may do what through a mount: other users and the control file."""

import errno
import os


def test_other_users_cannot_write_control(mount):
    m = mount("--allow-other")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # child: become nobody
        code = 99
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            results = []
            try:
                os.open(m.control, os.O_WRONLY)
                results.append("open-ok")
            except OSError as e:
                results.append(errno.errorcode[e.errno])
            try:
                with open(m.control) as f:
                    results.append("read-ok" if "state:" in f.read() else "read-empty")
            except OSError as e:
                results.append(errno.errorcode[e.errno])
            os.write(w, " ".join(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert out == "EACCES read-ok"
    assert m.status()["rules"] == []
