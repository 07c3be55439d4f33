"""A Gradio demo of a PCME model: retrieval with match probabilities, uncertainty and attention.

    python demo/app.py --model runs/main_job/pcme [--gallery DIR | --dataset shapes] [--port N]

Type a caption to rank the gallery's images, or upload an image to rank its captions (or, for a
gallery without captions, its images). Each result shows its score, the model's match
probability and an uncertainty bar (its sigma^2 against the rest of the gallery); the query gets
its own sigma^2, explained from the analysis saved next to the model, and an attention heatmap
over the image or the caption's words. The "Model analysis" tab shows the plots saved in the model
folder; the "Gallery" tab swaps in uploaded images at runtime (the model stays loaded).

As a Hugging Face Space: this file, ``demo_backend.py`` and ``requirements.txt`` at the Space's
root (see ``demo/README.md``); the model comes from ``--model`` or the ``PCME_MODEL`` variable.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: "ready in" counts them too

import argparse  # noqa: E402
import base64  # noqa: E402
import html  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_backend next to this file (also on a Space)

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from demo_backend import DemoBackend, DemoInputError, Gallery, QueryAnswer  # noqa: E402

DEFAULT_TOP_K = 8
CSS = """
.pcme-results { display: flex; flex-wrap: wrap; gap: 10px; }
.pcme-card { width: 150px; border: 1px solid #ccc; border-radius: 6px; padding: 6px; font-size: 12px; }
.pcme-card img { width: 136px; height: 136px; object-fit: contain; image-rendering: pixelated; }
.pcme-table { border-collapse: collapse; font-size: 13px; width: 100%; }
.pcme-table td, .pcme-table th { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; }
.pcme-ubar { display: inline-block; width: 80px; height: 9px; background: #e5e5e5; border-radius: 4px; vertical-align: middle; }
.pcme-ubar > span { display: block; height: 9px; background: #e07b39; border-radius: 4px; }
.pcme-card .pcme-ubar { width: 54px; }
.pcme-card .pcme-unc { white-space: nowrap; }
.pcme-error { color: #a40000; background: #fde8e8; border: 1px solid #f5a3a3; border-radius: 6px; padding: 8px; }
.pcme-word { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; }
"""


# ---------------------------------------------------------------------------- rendering
def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _uncertainty_bar(value: float | None, percentile: float | None) -> str:
    """A bar as long as the item's sigma^2 percentile in the searched gallery, with the value."""
    if value is None:
        return '<span class="pcme-unc">n/a (point embedding)</span>'
    width = 0.0 if percentile is None else max(2.0, min(100.0, percentile))
    title = f"σ² = {value:.4g}" + ("" if percentile is None else f", higher than {percentile:.0f}% of the gallery")
    return (
        f'<span class="pcme-ubar" title="{html.escape(title)}"><span style="width:{width:.0f}%"></span></span> '
        f'<span class="pcme-unc">σ² {value:.4g}</span>'
    )


def render_results(answer: QueryAnswer) -> str:
    """The ranked results as HTML: image cards (images) or a table (captions), best first."""
    style = f"<style>{CSS}</style>"
    header = (
        f'<p class="pcme-summary">{len(answer.results)} {"images" if answer.result_modality == "image" else "captions"}'
        f" from {html.escape(answer.gallery_name)}, best first ({answer.seconds * 1000:.0f} ms).</p>"
    )
    if answer.result_modality == "image":
        cards = []
        for item in answer.results:
            cards.append(
                f'<div class="pcme-card pcme-result" data-rank="{item.rank}" data-score="{item.score:.6g}" '
                f'data-uncertainty="{"" if item.uncertainty is None else f"{item.uncertainty:.6g}"}">'
                f'<img src="{_png_data_uri(item.image)}" alt="gallery image {html.escape(str(item.id))}"><br>'
                f"<b>#{item.rank}</b> score {item.score:.3f}<br>p(match) {item.match_probability:.3f}<br>"
                f"{_uncertainty_bar(item.uncertainty, item.uncertainty_percentile)}</div>"
            )
        return style + header + f'<div class="pcme-results">{"".join(cards)}</div>'
    rows = []
    for item in answer.results:
        body = (
            html.escape(item.text)
            if item.text is not None
            else f'<img src="{_png_data_uri(item.image)}" alt="gallery image" width="64">'
        )
        rows.append(
            f'<tr class="pcme-result" data-rank="{item.rank}" data-score="{item.score:.6g}" '
            f'data-uncertainty="{"" if item.uncertainty is None else f"{item.uncertainty:.6g}"}">'
            f"<td>{item.rank}</td><td>{body}</td><td>{item.score:.3f}</td><td>{item.match_probability:.3f}</td>"
            f"<td>{_uncertainty_bar(item.uncertainty, item.uncertainty_percentile)}</td></tr>"
        )
    table = (
        '<table class="pcme-table"><thead><tr><th>#</th><th>caption</th><th>score</th><th>p(match)</th>'
        f'<th>uncertainty</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return style + header + table


def render_query(answer: QueryAnswer) -> str:
    """The query's own uncertainty with its one-sentence explanation, and word attention for captions."""
    parts = [f"<style>{CSS}</style>", '<div class="pcme-query">']
    if answer.query_uncertainty is not None:
        parts.append(
            f'<p><b>Query uncertainty</b> {_uncertainty_bar(answer.query_uncertainty, answer.query_uncertainty_percentile)}</p>'
        )
    parts.append(f'<p class="pcme-explanation">{html.escape(answer.explanation)}</p>')
    if answer.word_attention:
        top = max(weight for _, weight in answer.word_attention) or 1.0
        words = "".join(
            f'<span class="pcme-word" title="attention {weight:.3f}" '
            f'style="background: rgba(224, 123, 57, {0.1 + 0.9 * weight / top:.2f})">{html.escape(token)}</span>'
            for token, weight in answer.word_attention
        )
        parts.append(f'<p><b>Attention over the caption\'s words</b> (darker = more weight): {words}</p>')
    parts.append("</div>")
    return "".join(parts)


def render_error(error: Exception) -> str:
    return f'<style>{CSS}</style><div class="pcme-error" role="alert">⚠ {html.escape(str(error))}</div>'


# ---------------------------------------------------------------------------- the app
def build_demo(
    model_dir: str | os.PathLike | None = None,
    gallery: Any = "shapes",
    *,
    backend: DemoBackend | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> gr.Blocks:
    """The Gradio Blocks app; builds a :class:`DemoBackend` (model + gallery index) unless one is given."""
    if backend is None:
        if model_dir is None:
            raise ValueError("build_demo needs model_dir (a PCME model folder) or backend=DemoBackend(...).")
        backend = DemoBackend(model_dir, gallery)

    def current(state: Gallery | None) -> Gallery:
        return state if state is not None else backend.gallery

    def search_caption(caption: str, k: float, state: Gallery | None):
        try:
            answer = backend.query_text(caption, int(k), gallery=current(state))
        except DemoInputError as error:
            return render_error(error), gr.update(value=None, visible=False), ""
        return render_query(answer), gr.update(value=None, visible=False), render_results(answer)

    def search_image(upload: Any, k: float, state: Gallery | None):
        try:
            answer = backend.query_image(upload, int(k), gallery=current(state))
        except DemoInputError as error:
            return render_error(error), gr.update(value=None, visible=False), ""
        heatmap = answer.attention_heatmap
        if heatmap is not None and max(heatmap.size) < 256:  # small images: enlarge for display
            scale = 256 // max(heatmap.size)
            heatmap = heatmap.resize((heatmap.width * scale, heatmap.height * scale), Image.Resampling.NEAREST)
        return render_query(answer), gr.update(value=heatmap, visible=heatmap is not None), render_results(answer)

    def use_uploaded_gallery(files: Any, progress=gr.Progress(track_tqdm=True)):
        started = time.perf_counter()
        try:
            if not files:
                raise DemoInputError("No files: upload some images (and optionally a captions.txt) first.")
            files = files if isinstance(files, list) else [files]
            paths = [Path(f) if isinstance(f, (str, os.PathLike)) else Path(f.name) for f in files]
            caption_files = [p for p in paths if p.name.endswith(".txt")]
            captions = None
            if caption_files:
                captions = [line.strip() for line in caption_files[0].read_text(encoding="utf-8").splitlines()]
            images = [p for p in paths if p not in caption_files]
            new_gallery = backend.load_gallery(images, captions=captions)
        except (DemoInputError, ValueError, UnicodeDecodeError) as error:
            return None, render_error(error)
        seconds = time.perf_counter() - started
        return new_gallery, f"<p class='pcme-gallery-status'>Now searching {html.escape(new_gallery.describe())} (indexed in {seconds:.1f} s).</p>"

    def reset_gallery():
        return None, f"<p class='pcme-gallery-status'>Now searching {html.escape(backend.gallery.describe())}.</p>"

    with gr.Blocks(title="PCME retrieval demo") as demo:
        gallery_state = gr.State(None)  # per browser session: None = the start-up gallery
        gr.Markdown(
            f"# Probabilistic cross-modal retrieval ({html.escape(backend.model_name)})\n"
            f"Searching **{html.escape(backend.gallery.describe())}**. Every embedding is a Gaussian: "
            "σ² (its mean variance) is the model's uncertainty, shown for each result and for your query."
        )
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column(scale=1):
                    caption = gr.Textbox(label="Caption", placeholder="e.g. a red circle at the top left",
                                         elem_id="caption-query")
                    caption_button = gr.Button("Search images", variant="primary", elem_id="caption-submit")
                    upload = gr.File(label="Or an image", file_count="single", type="filepath", elem_id="image-query")
                    image_button = gr.Button("Search with this image", variant="primary", elem_id="image-submit")
                    k = gr.Slider(1, 50, value=top_k, step=1, label="Results", elem_id="top-k")
                    heatmap = gr.Image(label="Where the image embedding looked (attention)", visible=False,
                                       interactive=False, elem_id="attention-heatmap")
                with gr.Column(scale=3):
                    query_info = gr.HTML(elem_id="query-info")
                    results = gr.HTML(elem_id="results")
            outputs = [query_info, heatmap, results]
            caption_button.click(search_caption, [caption, k, gallery_state], outputs, api_name="search_caption")
            caption.submit(search_caption, [caption, k, gallery_state], outputs, api_visibility="private")
            image_button.click(search_image, [upload, k, gallery_state], outputs, api_name="search_image")
        with gr.Tab("Gallery"):
            gallery_status = gr.HTML(
                f"<p class='pcme-gallery-status'>Now searching {html.escape(backend.gallery.describe())}.</p>",
                elem_id="gallery-status",
            )
            new_files = gr.File(label="Images for a new gallery (optionally with a captions.txt)",
                                file_count="multiple", type="filepath", elem_id="gallery-upload")
            with gr.Row():
                swap_button = gr.Button("Search these instead", variant="primary", elem_id="gallery-swap")
                reset_button = gr.Button("Back to the start-up gallery", elem_id="gallery-reset")
            swap_button.click(use_uploaded_gallery, [new_files], [gallery_state, gallery_status], api_name="swap_gallery")
            reset_button.click(reset_gallery, None, [gallery_state, gallery_status], api_name="reset_gallery")
        with gr.Tab("Model analysis"):
            if backend.analysis is not None and backend.analysis.spearman_rho is not None:
                gr.Markdown(
                    f"Measured on the model's test captions: Spearman ρ between caption σ² and vagueness "
                    f"(how many images a caption fits) = **{backend.analysis.spearman_rho:+.3f}** "
                    f"(from `{html.escape(Path(backend.analysis.source).name)}`)."
                )
            if backend.plots:
                for plot in backend.plots:
                    gr.Image(str(plot), label=plot.stem.replace("_", " "), interactive=False)
            else:
                gr.Markdown("No analysis plots (uncertainty vs vagueness, calibration) were saved in the model folder.")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("PCME_MODEL", "runs/main_job/pcme"),
                        help="a saved PCME model folder (or Hub id); default $PCME_MODEL or runs/main_job/pcme")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gallery", help="a folder of images (with an optional captions.txt) to search")
    source.add_argument("--dataset", choices=["shapes"], help="search a dataset's test split (default: shapes)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: gradio's, 7860)")
    parser.add_argument("--host", default=None, help="server address (default: gradio's, 127.0.0.1 or $GRADIO_SERVER_NAME)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="results shown by default")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        backend = DemoBackend(args.model, args.gallery or args.dataset or "shapes")
    except (ValueError, OSError) as error:  # not a PCME folder, corrupt weights, bad gallery: say which
        sys.exit(f"error: {error}")
    demo = build_demo(backend=backend, top_k=args.top_k)
    demo.queue()
    print(f"Model and index of {backend.gallery.describe()} ready in {time.perf_counter() - PROCESS_START:.1f} s "
          f"(imports included; the index took {backend.startup_seconds:.1f} s with the model load)", flush=True)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
