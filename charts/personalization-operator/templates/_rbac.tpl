{{/* The operator's rules on namespaced resources: in a ClusterRole when it serves every
namespace, in a Role per namespace when operator.watchNamespaces is set. */}}
{{- define "pjo.namespacedRules" }}
  # The resource it serves. kopf patches the object itself (finalizer, last-handled state).
  # get/patch on personalizationjobs and personalizationjobs/status are also what the per-job
  # Role grants the trainer: RBAC only lets the operator create a Role with verbs it holds.
  - apiGroups: ["personalization.dvar.dev"]
    resources: ["personalizationjobs"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["personalization.dvar.dev"]
    resources: ["personalizationjobs/status"]
    verbs: ["get", "patch"]
  # Children carry ownerReferences with blockOwnerDeletion, which the
  # OwnerReferencesPermissionEnforcement admission plugin only allows with update on finalizers.
  - apiGroups: ["personalization.dvar.dev"]
    resources: ["personalizationjobs/finalizers"]
    verbs: ["update"]
  # Per-job children: the trainer Job, its config, and the trainer's identity and status grant.
  # Children are created, and read back only when a create conflicts (adoption check). Only a
  # pack's are patched: its ConfigMap and Role when a member joins or leaves, its Job's owner
  # references when a member joins. Jobs are also watched (kopf) and deleted when their pod can
  # never start (it would hold a GPU).
  - apiGroups: ["batch"]
    resources: ["jobs"]
    verbs: ["create", "get", "list", "watch", "delete", "patch"]
  - apiGroups: [""]
    resources: ["configmaps"]
    verbs: ["create", "get", "patch"]
  - apiGroups: [""]
    resources: ["serviceaccounts"]
    verbs: ["create", "get"]
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["roles"]
    verbs: ["create", "get", "patch"]
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["rolebindings"]
    verbs: ["create", "get"]
  # Trainer pods are watched (label app=trainer) and listed to explain failures (image pull,
  # OOM, a pod that cannot start).
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  # Events on every transition; Warning events of Jobs and pods are watched (type=Warning) to
  # tell why a pod does not start (FailedCreate, FailedAttachVolume, FailedScheduling).
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create", "patch", "list", "watch"]
{{- end }}
