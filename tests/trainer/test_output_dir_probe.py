"""The output folder's writability check, run by every process of a multi-process job at once."""

from __future__ import annotations

import threading

from personalize.preflight import prepare_output_dir


def test_processes_checking_one_output_folder_at_once_do_not_fail_each_other(tmp_path):
    out = tmp_path / "out"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def check_many_times() -> None:
        start.wait()
        try:
            for _ in range(300):
                prepare_output_dir(out)
        except BaseException as error:  # noqa: BLE001  (collected, asserted below)
            errors.append(error)

    threads = [threading.Thread(target=check_many_times) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(out.iterdir()) == []  # no probe left behind
