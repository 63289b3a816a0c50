"""What a user does on SDAccel's generate page (the standalone web UI, or the same Blocks as a tab inside
A1111/Forge): set the fields, click Generate or Interrupt, read back the image, the status and the statistics."""

from __future__ import annotations

import os
from pathlib import Path

TIMEOUT_MS = 180_000


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def status(page) -> str:
    return page.locator("#sdaccel_status").first.inner_text()  # gradio 3 (A1111) puts the id on two nested divs


def generate(page, *, width=64, height=64, steps=2, seed=7, prompt="a red fox in the snow",
             channels_last=True) -> tuple[str, list]:
    """Fill the form, click Generate and wait for the statistics: (statistics text, [image width, height])."""
    page.locator("#sdaccel_prompt textarea").fill(prompt)
    for elem_id, value in (("sdaccel_width", width), ("sdaccel_height", height), ("sdaccel_steps", steps),
                           ("sdaccel_seed", seed)):
        set_number(page, elem_id, value)
    if channels_last:
        page.locator("#sdaccel_opt_channels_last").get_by_text("Channels-last", exact=True).first.click()  # open it
        page.locator("#sdaccel_use_channels_last input").check()
    before = page.locator("#sdaccel_stats textarea").input_value()  # an earlier run's, if any: wait for new ones
    page.click("#sdaccel_generate")
    page.wait_for_function("(before) => { const v = document.querySelector('#sdaccel_stats textarea')?.value || '';"
                           " return v.includes('it/s') && v !== before; }", arg=before, timeout=TIMEOUT_MS)
    stats = page.locator("#sdaccel_stats textarea").input_value()
    image = page.locator("#sdaccel_gallery img").first
    image.wait_for(state="visible", timeout=TIMEOUT_MS)
    size = page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", image.element_handle())
    return stats, size


def add_lora(page, name: str, strength: float) -> str:
    """Pick a LoRA in the LoRAs accordion, set its strength, click Add to prompt: the prompt it leaves."""
    page.locator("#sdaccel_loras").get_by_text("LoRAs", exact=True).first.click()  # open the accordion
    box = page.locator("#sdaccel_lora_name input").first
    box.click()
    page.get_by_role("option", name=name, exact=True).first.click()
    set_number(page, "sdaccel_lora_strength", strength)
    page.click("#sdaccel_add_lora")
    page.wait_for_function(f"() => (document.querySelector('#sdaccel_prompt textarea')?.value || '')"
                           f".includes('<lora:{name}:')", timeout=TIMEOUT_MS)
    return page.locator("#sdaccel_prompt textarea").input_value()


def interrupt_long_generation(page, steps=200, size=256) -> str:
    """Start a long generation, click Interrupt once it has taken a step: the status text it ends with."""
    for elem_id, value in (("sdaccel_width", size), ("sdaccel_height", size), ("sdaccel_steps", steps)):
        set_number(page, elem_id, value)
    page.click("#sdaccel_generate")
    page.wait_for_function("() => /step [1-9]/.test(document.querySelector('#sdaccel_status')?.innerText || '')",
                           timeout=TIMEOUT_MS)
    bar = page.evaluate("() => { const bar = document.querySelector('#sdaccel_status progress');"
                        " return bar && [bar.value, bar.max, bar.getBoundingClientRect().width]; }")
    assert bar and bar[1] == steps and 1 <= bar[0] < steps and bar[2] > 100, bar  # a drawn progress bar
    page.click("#sdaccel_interrupt")
    page.wait_for_function("() => (document.querySelector('#sdaccel_status')?.innerText || '')"
                           ".includes('Interrupted')", timeout=TIMEOUT_MS)
    return status(page)


def generate_again(page) -> str:
    """A small generation after an interrupted one: the status it ends with."""
    for elem_id, value in (("sdaccel_width", 64), ("sdaccel_height", 64), ("sdaccel_steps", 2)):
        set_number(page, elem_id, value)
    page.click("#sdaccel_generate")
    page.wait_for_function("() => (document.querySelector('#sdaccel_status')?.innerText || '').startsWith('done')",
                           timeout=TIMEOUT_MS)
    return status(page)


def open_tab(page, name: str) -> None:
    """Click one of the page's tab buttons by its title (gradio 3's plain buttons or gradio 4/5's tab role)."""
    import re

    tab = page.get_by_role("tab", name=name, exact=True)
    if not tab.count():
        tab = page.locator("button", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))
    tab.first.click()


def run_bench(page, presets=("baseline", "channels-last")) -> tuple[str, str]:
    """The Bench sub-tab on the selected checkpoint, as small as it goes (64x64, one step, one repeat, no
    warm-up): (the table text, the status it ends with)."""
    open_tab(page, "Bench")
    page.wait_for_selector("#sdaccel_run_bench", state="visible", timeout=TIMEOUT_MS)
    for elem_id, value in (("sdaccel_bench_size", 64), ("sdaccel_bench_steps", 1), ("sdaccel_bench_repeats", 1),
                           ("sdaccel_bench_warmup", 0)):
        set_number(page, elem_id, value)
    page.locator("#sdaccel_bench_checkpoint input").check()
    choices = page.locator("#sdaccel_bench_presets label")
    for i in range(choices.count()):
        choice = choices.nth(i)
        choice.locator("input[type=checkbox]").set_checked(choice.inner_text().strip() in presets)
    page.click("#sdaccel_run_bench")
    page.wait_for_function("() => /done:|Error/.test(document.querySelector('#sdaccel_bench_status')?.innerText "
                           "|| '')", timeout=TIMEOUT_MS)
    return page.locator("#sdaccel_bench_table").first.inner_text(), \
        page.locator("#sdaccel_bench_status").first.inner_text()


def keep_screenshot(page, name: str) -> None:
    """Into $SDACCEL_SCREENSHOT_DIR (set it to results/ to refresh the README's screenshots)."""
    keep = os.environ.get("SDACCEL_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / name), full_page=False)
