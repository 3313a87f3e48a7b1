"""WebShop (Yao et al., 2022) in-process: catalog, goals, Lucene-parity search, pages and the official reward."""
