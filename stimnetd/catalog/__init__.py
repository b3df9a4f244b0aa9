"""Catalogs: a site's named datasets (CSV tables, NIfTI image columns, ROIs) loaded and
validated once, and read by the query engine, the privacy layer and the sandbox."""

from stimnetd.catalog.loader import (
    Catalog,
    CatalogError,
    CatalogSet,
    TableInfo,
    UnknownCatalog,
    count_label,
    load_catalog,
    load_catalogs,
)

__all__ = ["Catalog", "CatalogError", "CatalogSet", "TableInfo", "UnknownCatalog", "count_label",
           "load_catalog", "load_catalogs"]
