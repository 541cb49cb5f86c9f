"""``workbench report``: one command from a model and a data set to a folder of findings.

``config``: what to run (TOML). ``compute``: the sweep, the recordings and every analysis, as
named polars tables. ``findings``: the sentences the numbers support. ``figures``: each figure as
data (``FigureSpec``), drawn by plotly for the HTML page and by matplotlib for the PNGs.
``write``: the folder (index.html, summary.md, figures/*.png, tables/*.parquet).
"""
