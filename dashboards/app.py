"""The workbench dashboard: ``workbench dashboard`` (or ``streamlit run dashboards/app.py``).

Navigation and the shared sidebar (model, input) only; each page lives in ``dashboards/views``.
The page can also be picked with ``?page=explore|methods|compare|failures`` in the address.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by ``streamlit run``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from dashboards import state  # noqa: E402

PAGES = ("Explore", "Methods", "Compare", "Failures")


def choose_page() -> str:
    asked = str(st.query_params.get("page", "")).capitalize()
    index = PAGES.index(asked) if asked in PAGES else 0
    page = st.sidebar.radio("page", PAGES, index=index, key="page")
    st.query_params["page"] = page.lower()
    return page


def choose_model() -> str | None:
    """The model name or folder from the sidebar, loaded (None, with an error shown, if it cannot be)."""
    from workbench.models.loading import ModelNotAvailable

    name = st.sidebar.text_input("model (shipped name, hub name or local folder)", state.DEFAULT_MODEL,
                                 key="model").strip() or state.DEFAULT_MODEL
    try:
        with st.spinner(f"loading {name} ..."):
            state.load_model(name)
    except ModelNotAvailable as e:
        st.error(f"cannot load model {name!r}: {state.model_unavailable(name, e)}")
        return None
    except Exception as e:  # an unsupported architecture, a broken folder: shown, never a traceback
        st.error(f"cannot load model {name!r}: {type(e).__name__}: {e}")
        return None
    return name


def choose_subject():
    """The image and question from the sidebar: a data-set sample or an upload (None on a bad input)."""
    source = st.sidebar.radio("input", ("data-set sample", "upload an image"), key="source", horizontal=True)
    if source == "data-set sample":
        path = st.sidebar.text_input("data set (JSONL, parquet, save_to_disk folder or COCO-style JSON)",
                                     state.DEFAULT_DATASET, key="dataset")
        try:
            samples = state.dataset(path)
        except Exception as e:
            st.error(f"cannot read data set {path!r}: {e}")
            return None
        ids = [s.id for s in samples]
        chosen = st.sidebar.selectbox("sample", ids, key="sample")
        return state.subject_of_sample(samples[ids.index(chosen)])
    # The uploader's own limit is the app's, so the size it announces is the one enforced.
    upload = st.sidebar.file_uploader("image", key="upload", max_upload_size=state.MAX_UPLOAD_BYTES // 2**20)
    question = st.sidebar.text_input("question", "what colour is the circle ?", key="question")
    gold = st.sidebar.text_input("gold answer (optional)", "", key="gold").strip() or None
    if upload is None:
        st.info("upload an image in the sidebar (PNG, JPEG, ...; at most "
                f"{state.MAX_UPLOAD_BYTES // 2**20} MB and {state.MAX_UPLOAD_PIXELS // 10**6} megapixels)")
        return None
    try:
        image = state.decode_upload(upload.name, upload.getvalue())
    except state.UploadError as e:
        st.error(f"upload refused: {e}")
        return None
    return state.Subject.of(image, question, gold)


def main() -> None:
    st.set_page_config(page_title="VLM pruning workbench", layout="wide")
    page = choose_page()
    st.sidebar.caption(f"results folder: {state.shown_path(state.results_root())}")
    if page == "Compare":
        from dashboards.views import compare
        compare.render()
        return
    model = choose_model()
    if model is None:
        return
    if page == "Failures":
        from dashboards.views import failures
        failures.render(model)
        return
    subject = choose_subject()
    if subject is None:
        return
    if page == "Explore":
        from dashboards.views import explore
        explore.render(model, subject)
    else:
        from dashboards.views import methods
        methods.render(model, subject)


main()
