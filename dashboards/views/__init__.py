"""One module per page: ``render(...)`` draws the page into the current Streamlit script run."""
