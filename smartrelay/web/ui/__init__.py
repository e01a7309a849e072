"""
The reports UI: server-rendered pages under C{/} (login, dashboard,
search and message pages, events, bounces, suppressions, queue, domains)
over L{smartrelay.web.queries}, the API's query layer.  See C{docs/ui.md}.
"""
