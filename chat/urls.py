"""Pages of the chat."""

from django.urls import path

from chat import views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<id:conversation_id>/", views.chat_page, name="conversation"),
    path("s/<str:token>/", views.shared_page, name="shared"),
]
