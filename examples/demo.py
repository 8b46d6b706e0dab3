"""The main job on the embedded default (``make demo``).

Current stage: shows that an unmodified SimpleTuner, started as a user starts it
(``simpletuner server``), lists and describes the plugin's ``longcat_video`` family. The tiny
end-to-end I2V training run replaces this once the family can train.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from simpletuner_longcat_video.hostserver import host_server


def main() -> None:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="longcat-demo-") as tmp, host_server(Path(tmp)) as server:
        families = server.get_json("/api/models")["families"]
        details = server.get_json("/api/models/longcat_video")
        flavours = server.get_json("/api/models/longcat_video/flavours")["flavours"]
        plugin_lines = [line for line in server.log().splitlines() if "simpletuner_longcat_video" in line]
    print("\n".join(plugin_lines))
    print(f"host lists longcat_video: {'longcat_video' in families} ({len(families)} families)")
    print(f"class: {details.get('class')}")
    print(f"flavours: {flavours}")
    print("text encoder:", json.dumps(details["attributes"].get("text_encoder_configuration")))
    print(f"demo finished in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
