"""Routes of the documents API, mounted under /api/."""

from django.urls import path

from rag import views

urlpatterns = [
    path("documents", views.documents, name="rag-documents"),
    path("documents/<id:pk>", views.document_detail, name="rag-document"),
    path("documents/<id:pk>/reingest", views.document_reingest, name="rag-document-reingest"),
    path("collections", views.collections, name="rag-collections"),
    path("search", views.search_view, name="rag-search"),
]
