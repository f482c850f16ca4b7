"""Background threads at a lower CPU priority: the calling thread only, never the process."""
import os
import sys
import threading

import pytest

from consortium import priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling classes are Linux's")
def test_lower_thread_priority_lowers_only_the_calling_thread():
    me = threading.get_native_id()
    before = os.sched_getscheduler(me)
    seen = {}

    def background():
        seen["ok"] = priority.lower_thread_priority()
        seen["policy"] = os.sched_getscheduler(threading.get_native_id())

        def child():   # a thread it starts, as llama.cpp starts its workers, inherits the class
            seen["child"] = os.sched_getscheduler(threading.get_native_id())
        c = threading.Thread(target=child)
        c.start()
        c.join()

    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["ok"] and seen["policy"] == seen["child"] == os.SCHED_IDLE
    assert os.sched_getscheduler(me) == before != os.SCHED_IDLE
